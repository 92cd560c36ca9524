"""The frozen CLIP teacher (`clip`), the text prompts it embeds (`prompts`, pure Python so the
conversion tool can use it without JAX) and a tiny teacher for tests and the demo (`tiny`)."""
