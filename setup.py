from setuptools import find_packages, setup

setup(
    name="qac-diffusers",
    version="0.1.0",
    description="Quantized adaptive conditions for few-step diffusion sampling, as a Hugging Face diffusers extension.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The model card template lives in the top-level model_cards/ and is installed as qac_diffusers/model_cards/.
    packages=find_packages(include=["qac_diffusers", "qac_diffusers.*"]) + ["qac_diffusers.model_cards"],
    package_dir={"qac_diffusers.model_cards": "model_cards"},
    package_data={"qac_diffusers.model_cards": ["*.md"]},
    python_requires=">=3.10",
    # torch is deliberately unpinned: install the build that fits your machine (CPU or CUDA) first.
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "accelerate>=0.30",
        "datasets>=2.19",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "evaluate>=0.4",
        "numpy>=1.24",
        "Pillow>=9.0",
        "scikit-learn>=1.2",
        "tqdm>=4.60",
        "tensorboard>=2.12",
    ],
    extras_require={
        "dev": ["pytest>=7", "matplotlib>=3.6"],
    },
)
