from setuptools import find_packages, setup

setup(
    name="frcnn",
    version="0.1.0",
    description="Faster R-CNN training framework in pure PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["frcnn", "frcnn.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "pycocotools>=2.0.6",
        "pyyaml>=6.0",
        "tensorboard>=2.12",
        "tqdm>=4.60",
    ],
    extras_require={"test": ["pytest>=7.0", "ruff>=0.4"]},
)
