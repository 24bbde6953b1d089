"""fedseg: federated medical image segmentation where every hospital keeps its images."""
from setuptools import find_packages, setup

setup(
    name="fedseg",
    version="0.1.0",
    description="Federated medical image segmentation over PySyft datasites",
    packages=find_packages(include=["fedseg", "fedseg.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "syft==0.9.5",
        # syft 0.9.5 imports sniffio without declaring it.
        "sniffio",
        "torch==2.14.1",
        "numpy<=1.24.4",
        "pillow",
        "click>=8.1",
        "cryptography>=42",
        # rich draws the per-round progress and the per-site tables on the terminal.
        "rich",
        # matplotlib draws the Dice curves (syft pins it below 3.9.1 already).
        "matplotlib",
        # tensorboardX writes each run's TensorBoard scalars: 90 kB, needs only protobuf;
        # the tensorboard package wants a protobuf newer than syft 0.9.5 allows.
        "tensorboardX>=2.6",
    ],
    extras_require={
        # psutil measures memory and file descriptors in the soak test (scripts/soak.py).
        "test": ["pytest>=8", "hypothesis>=6.100", "psutil"],
    },
    entry_points={"console_scripts": ["fedseg=fedseg.cli:main"]},
)
