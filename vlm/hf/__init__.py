"""Hugging Face remote code shipped inside an exported folder (`python -m vlm.export --format hf`).

The modules here are templates, not importable from `vlm.hf`: their relative imports name the flat copies of
the project's model, image and chat code that `vlm.export` writes beside them (`vlm/model/vlm.py` becomes
`vlm_model_vlm.py`, its `vlm.*` imports made relative), so that transformers' dynamic-module loader imports
them from the exported folder with `trust_remote_code=True` and no `vlm` package installed.
"""
