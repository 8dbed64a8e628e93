"""The reference shapes, shared by the CPU and GPU benchmarks."""

# name: (N, C, spatial sizes, G)
SHAPES = {
    "A": (1, 32, (32, 32), 8),
    "B": (8, 64, (56, 56), 32),
    "C": (1, 320, (64, 64), 32),
    "D": (2, 512, (32, 32), 32),
    "E": (256, 1024, (), 32),
    "F": (16, 256, (128,), 16),
}
