"""The bundled demo: a small frozen byte-level T5 and a held-out task a prompt can learn."""
import pathlib

FROZEN_MODEL_DIR = pathlib.Path(__file__).resolve().parent / "frozen_model"
