"""Request and response bodies: /predict, the Open Inference Protocol v2, and the service routes."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    StrictStr,
    model_serializer,
    model_validator,
)

# Upper bound of ``max_det``: more boxes than this per image is a bug in the client, not a use.
MAX_DET_LIMIT = 1000

# Parameters are name -> string | number | boolean in the protocol.
Parameters = dict[str, StrictStr | float | int | bool]


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong and what to do.")


# --- /predict -------------------------------------------------------------------------------------------
class PredictRequest(BaseModel):
    """One text (``text``) or a list of texts (``texts``), not both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "a warm, funny and moving film"},
                {"texts": ["a warm, funny and moving film", "dull, flat and far too long"]},
            ]
        },
    )
    text: StrictStr | None = Field(None, description="A single text to classify.")
    texts: list[StrictStr] | None = Field(None, description="Several texts, classified in one call.")

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give either 'text' (a string) or 'texts' (a list of strings), not both nor neither")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class PredictionOut(BaseModel):
    label: str = Field(description="The most probable label.")
    score: float = Field(description="Its probability.")
    probabilities: dict[str, float] = Field(description="Probability of every label (softmax of the logits).")
    truncated: bool = Field(description="True when the text was cut to the server's max_length tokens.")


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "default",
                    "target": "onnx-int8",
                    "predictions": [
                        {
                            "label": "positive",
                            "score": 0.97,
                            "probabilities": {"negative": 0.03, "positive": 0.97},
                            "truncated": False,
                        }
                    ],
                }
            ]
        }
    )
    model: str
    target: str
    predictions: list[PredictionOut] = Field(description="One per input text, in input order.")


# --- /predict for detection models -------------------------------------------------------------------
class DetectOptions(BaseModel):
    """Post-processing options of a detection request (query parameters, form fields or JSON keys).
    One the request leaves out is the served export's own (its artifact.json's ``postprocess``, from the
    recipe's ``detection.*``); these defaults stand for an export that records none."""

    model_config = ConfigDict(extra="forbid")
    conf_threshold: float = Field(
        0.25, ge=0, le=1, description="Keep boxes whose class score is above this. Default: the export's "
        "detection.conf_threshold (artifact.json postprocess), 0.25 for an export that records none."
    )
    iou_threshold: float = Field(
        0.6, ge=0, le=1, description="NMS: drop a box overlapping a better one of its class by more than this IoU "
        "(an onnx-nms export applies its own, in the graph). Default: the export's detection.iou_threshold "
        "(artifact.json postprocess), 0.6 for an export that records none."
    )
    max_det: int = Field(
        100, ge=1, le=MAX_DET_LIMIT, description="Most detections returned per image. Default: the export's "
        "detection.max_det (artifact.json postprocess), 100 for an export that records none."
    )


class DetectRequest(BaseModel):
    """One base64 image (``image``) or several (``images``), not both, with optional options. (Files
    can instead be sent as multipart/form-data parts named ``file`` or ``files``.)"""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": "iVBORw0KGgoAAAANSUhEUgAA...", "conf_threshold": 0.4},
                {"images": ["data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ...", "iVBORw0KGgoAAAANSUhEUgAA..."]},
            ]
        },
    )
    image: StrictStr | None = Field(None, description="An image file, base64 (optionally a data: URL).")
    images: list[StrictStr] | None = Field(None, description="Several image files, base64, detected in one call.")
    conf_threshold: float | None = Field(None, ge=0, le=1,
                                         description=DetectOptions.model_fields["conf_threshold"].description)
    iou_threshold: float | None = Field(None, ge=0, le=1,
                                        description=DetectOptions.model_fields["iou_threshold"].description)
    max_det: int | None = Field(None, ge=1, le=MAX_DET_LIMIT, description=DetectOptions.model_fields["max_det"].description)

    @model_validator(mode="after")
    def _one_of(self) -> DetectRequest:
        if (self.image is None) == (self.images is None):
            raise ValueError("give either 'image' (a base64 string) or 'images' (a list of them), not both nor neither")
        return self

    def items(self) -> list[str]:
        return [self.image] if self.image is not None else list(self.images or [])

    def options(self) -> dict[str, float | int]:
        return {k: v for k in DetectOptions.model_fields if (v := getattr(self, k)) is not None}


class DetectionOut(BaseModel):
    label: str
    class_id: int = Field(description="Index of the label in the model's labels.")
    score: float = Field(description="Class probability of the box.")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the image as sent (EXIF orientation "
                                         "applied), origin top left.", min_length=4, max_length=4)
    category_id: int | None = Field(None, description="The dataset's category id of the label (COCO "
                                    "category_id, e.g. 1..90 with gaps), for a model trained on COCO-format data; "
                                    "left out when its data named none (YOLO).")

    @model_serializer(mode="wrap")
    def _unknown_category_left_out(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("category_id") is None:
            out.pop("category_id", None)
        return out


class ImageDetections(BaseModel):
    width: int = Field(description="Width of the image as sent (after EXIF orientation), in pixels.")
    height: int
    detections: list[DetectionOut] = Field(description="Best score first.")


class DetectResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "shapes",
                    "target": "onnx",
                    "predictions": [
                        {"width": 640, "height": 480, "detections": [
                            {"label": "circle", "class_id": 0, "score": 0.91, "box": [12.5, 40.0, 118.25, 150.0]}
                        ]}
                    ],
                }
            ]
        }
    )
    model: str
    target: str
    predictions: list[ImageDetections] = Field(description="One per input image, in input order.")


# --- Open Inference Protocol v2 ---------------------------------------------------------------------------
class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable-size dimension.")


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters | None = None


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(
        None, description="Row-major contents, nested or flat; left out when the tensor's bytes follow the JSON "
        "(binary tensor data extension: parameters.binary_data_size)."
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    """``$inference_request`` of the Open Inference Protocol (KServe v2, Triton)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {"name": "text", "shape": [2], "datatype": "BYTES",
                         "data": ["a warm, funny and moving film", "dull and flat"]}
                    ],
                    "outputs": [{"name": "probabilities"}],
                },
                {
                    "inputs": [
                        {"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [2, 5, 27, 3]},
                        {"name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1]},
                    ]
                },
            ]
        },
    )
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(None, description="Left out for a binary output (parameters.binary_data_size).")


class InferenceResponse(BaseModel):
    """``$inference_response``: outputs flattened row-major; ``id`` echoes the request's."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "default",
                    "id": "42",
                    "outputs": [
                        {"name": "probabilities", "shape": [2, 2], "datatype": "FP32",
                         "data": [0.03, 0.97, 0.91, 0.09]}
                    ],
                }
            ]
        }
    )
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


# --- service routes ----------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: str = Field(description="'ok' when the model is loaded and serving.")
    model: str
    target: str


class MetadataResponse(BaseModel):
    """What is served. Facts of the task family's codec beyond the fields below pass through as they are."""

    model_config = ConfigDict(extra="allow")

    model: str
    target: str
    task: str = Field(description="The task family (artifact.json's task): text-classification, detection, ...")
    inputs: str = Field(description="What POST /predict takes: 'texts', 'images', ... (the task family's).")
    platform: str
    runtime: dict[str, Any] = Field(description="Runner class and its runtime facts (providers, threads).")
    labels: list[str]
    max_length: int | None = Field(None, description="Text models: tokens kept per text.")
    overflow: str | None = Field(None, description="Text models: what happens to longer texts.")
    image_size: int | None = Field(None, description="Detection models: the square input images are letterboxed to.")
    nms_in_graph: bool | None = Field(None, description="Detection models: NMS runs inside the artifact.")
    batching: dict[str, Any]
    artifact: dict[str, Any] = Field(description="artifact.json: file, sha256, size, precision, io, parity.")
    run: dict[str, Any] = Field(description="Figures the run's manifest recorded, by stage (accuracy, parity).")
    versions: dict[str, str]
