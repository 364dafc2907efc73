from distill.export import load_student

__all__ = ["load_student"]
