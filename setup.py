from setuptools import find_packages, setup

setup(
    name="megatron-lightseq",
    version="0.1.0",
    description="LightSeq sequence-parallel attention (DistAttn) for Megatron-Core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_lightseq", "megatron_lightseq.*"]),
    python_requires=">=3.11",
    # A range, not a pin: an installed torch (CPU 2.13.0 here, a cluster's CUDA build there) satisfies it.
    install_requires=["torch>=2.4", "tqdm"],
    extras_require={
        "megatron": ["megatron-core>=0.16"],
        "triton": ["triton>=3.0"],
        # transformers: tests/test_hf_llama.py builds a tiny LlamaForCausalLM (no download) as the oracle
        "test": ["pytest>=8", "numpy", "matplotlib", "transformers"],
        "plot": ["matplotlib"],
    },
)
