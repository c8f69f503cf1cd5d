"""Object detection: YOLO-style detectors distilled on YOLO or COCO datasets.

The numpy/PIL modules (boxes_np, synthetic, data, metrics) import no torch, so a server can
letterbox inputs and run NMS without it; the torch side (models, loss) lives beside them.
"""
