"""More ways to teach: black-box teachers (an ONNX export, an edgekd server, any Open Inference
Protocol v2 endpoint), several teachers combined, and extra unlabelled texts the teacher labels.

All of them end where a local teacher ends: soft targets cached in ``runs/<name>/teacher/``
(see ``edgekd.teachers.stage``), so the distill stage does not know which kind taught.

Recipe examples::

    teacher:                       # a remote edgekd server; the student is built from minilm-l6
      kind: edgekd                 # model | onnx | edgekd | v2
      url: http://10.0.0.5:8000
      api_key_env: TEACHER_KEY     # the key is read from this variable, never written in the recipe
      targets: probs               # probs | logits (v2, onnx) | labels (hard targets)
      model: minilm-l6             # local base: tokenizer and the layers the student starts from
      client: {batch_size: 32, requests_per_second: 10, max_attempts: 5, backoff_s: 0.5}
      unlabelled: {dataset: extra_reviews.csv, text_column: text}

    teacher:                       # the fine-tuned local teacher plus a v2 endpoint, weighted 1:2
      model: minilm-l6
      ensemble:
        - {kind: v2, url: http://triton:8000, model_name: sentiment, labels: [negative, positive], weight: 2}
      combine: average             # or most_confident

    distill: {rounds: 3}           # born-again: rounds 2 and 3 learn from the previous round's student
"""

from edgekd.teachers.cache import AnswerCache
from edgekd.teachers.client import RateLimiter, TeacherClient, TeacherRequestError
from edgekd.teachers.combine import as_probabilities, combine, log_targets
from edgekd.teachers.export import export_classifier, export_run_teacher
from edgekd.teachers.sources import EdgeKDTeacher, OnnxTeacher, V2Teacher, ask_all, open_black_box

__all__ = [
    "AnswerCache",
    "EdgeKDTeacher",
    "OnnxTeacher",
    "RateLimiter",
    "TeacherClient",
    "TeacherRequestError",
    "V2Teacher",
    "as_probabilities",
    "ask_all",
    "combine",
    "export_classifier",
    "export_run_teacher",
    "log_targets",
    "open_black_box",
]
