from setuptools import find_packages, setup

setup(
    name="nnclr_tf",
    version="0.1.0",
    description="NNCLR (Nearest-Neighbor Contrastive Learning of Visual Representations) in "
                "TensorFlow 2 / Keras 3",
    packages=find_packages(include=["nnclr_tf", "nnclr_tf.*"]),
    # TensorFlow 2.21.0 publishes wheels for CPython 3.10-3.13 only (none for 3.9 or 3.14 on PyPI);
    # all pins below, test extras included, resolve on each of those (to wheels, except
    # tensorflow-datasets' pure-Python `promise`, an sdist). CI here runs 3.11.
    python_requires=">=3.10,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "tensorboard>=2.20,<3",
        "tensorflow-datasets>=4.9.9,<5",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "scikit-learn>=1.4,<2",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # tensorflow-serving-api writes the exports' warm-up requests (skipped with a warning
        # without it) and the tests parse them; it needs nothing beyond what tensorflow pins.
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "tensorflow-serving-api>=2.21,<2.22"],
        "serving": ["tensorflow-serving-api>=2.21,<2.22"],
    },
)
