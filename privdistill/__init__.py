"""privdistill: Privacy Distillation of medical-image diffusion models (teacher -> filter -> student)."""

__version__ = "0.1.0"
