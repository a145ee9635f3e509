"""instructkit: make a pretrained language model follow instructions, the InstructGPT way.

Importing the package is light: heavy libraries (torch, transformers, peft, accelerate) are
imported inside the modules that need them, so data formats, configs and losses load fast.
"""

__version__ = "0.1.0"
