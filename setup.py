from setuptools import find_packages, setup

setup(
    name="kd_engine",
    version="0.1.0",
    description="Distributed knowledge distillation for transformers on DeepSpeed",
    packages=find_packages(include=["kd_engine", "kd_engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.16",
        "transformers>=5.0",
        "datasets>=3.0",
        "accelerate>=1.0",
        "sentencepiece",
        "tensorboard",
        "tqdm",
        "PyYAML",
        "safetensors",
    ],
    extras_require={"mpi": ["mpi4py"], "gguf": ["gguf"], "test": ["pytest"],
                    "plots": ["matplotlib"],
                    # peers measured by benchmarks/peer_step.py; see requirements-bench.txt for the pinned install
                    "bench": ["trl==1.16.0"]},
    entry_points={
        "console_scripts": [
            "kd-train=kd_engine.cli:main",
            "kd-shrink=kd_engine.shrink:main",
        ]
    },
)
