"""The embedded demo: a synthetic chat corpus (corpus.py) and a small Llama target trained on it
from scratch on CPU (target.py), so the whole pipeline runs with no download and no GPU."""
