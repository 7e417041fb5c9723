"""Red-teaming attacks as plugins, installed as ``duobench.attacks``."""
