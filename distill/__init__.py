from distill.export import load_student
