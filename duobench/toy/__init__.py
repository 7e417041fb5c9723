"""The toy world: drawn shapes, a tiny SD-architecture model trained by duobench, and an exact judge."""
