"""Conventions shared by the data pipeline, the model and the converters.

They follow LLaVA/VILA: ignored label positions carry -100, and a visual placeholder in the
token ids is the (negative, never embedded) id -200.
"""

IGNORE_INDEX = -100
# One frame/image placeholder in token ids. The packer expands each frame's placeholder into
# ``tokens_per_frame`` consecutive copies; the model replaces each run with the frame's
# projected visual tokens, in frame order.
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_VIDEO_TOKEN = "<video>"
