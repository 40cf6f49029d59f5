from setuptools import find_packages, setup


setup(
    name="qac-diffusers",
    version="0.1.0",
    description="Quantized adaptive conditions for few-step diffusion sampling, as a Hugging Face diffusers "
    "extension.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The model card template lives in the top-level model_cards/ and is installed as qac_diffusers/model_cards/.
    packages=find_packages(include=["qac_diffusers", "qac_diffusers.*"]) + ["qac_diffusers.model_cards"],
    package_dir={"qac_diffusers.model_cards": "model_cards"},
    package_data={
        "qac_diffusers.model_cards": ["*.md"],
        # The `evaluate` metric script (evaluate loads the script named after its folder). A data folder, not a
        # package: a subpackage `frechet_distance` would shadow the function qac_diffusers.metrics.frechet_distance.
        "qac_diffusers.metrics": ["frechet_distance/frechet_distance.py"],
    },
    python_requires=">=3.10",
    # Lower bounds: the versions the test suite was run against. Install torch first, in the build that fits your
    # machine (CPU or CUDA); `make install` does so (TORCH_SPEC).
    install_requires=[
        "torch>=2.13",
        "diffusers>=0.42.1",
        "transformers>=5.24.0",
        "accelerate>=1.15.0",
        "datasets>=5.2.0",
        "safetensors>=0.8.0",
        "huggingface_hub>=2.4.0",
        "evaluate>=0.4.6",
        "numpy>=2.4.6",
        "Pillow>=13.0.0",
        "scikit-learn>=1.9.1",
        "scipy>=1.17.1",  # the RK45 reference sampler of rectified flow
        "tqdm>=4.70.1",
        "tensorboard>=2.21.0",
    ],
    extras_require={
        # ruff is pinned: `make test` runs `ruff check`, and a newer ruff may add checks.
        "dev": ["pytest>=9.2.0", "matplotlib>=3.11.2", "ruff==0.17.6"],
    },
)
