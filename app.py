"""Hugging Face Spaces / `streamlit run app.py` entry point: the muselab studio."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).parent / "src" / "muselab" / "ui" / "app.py"), run_name="__main__")
