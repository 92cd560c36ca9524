"""The frozen CLIP teacher and the text prompts it embeds."""
from uniemox_jax.teacher.clip import ClipTeacher, DEFAULT_CLIP  # noqa: F401
from uniemox_jax.teacher.prompts import build_prompt  # noqa: F401
