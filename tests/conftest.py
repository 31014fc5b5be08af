"""Shared fixtures (a small embedded corpus converted to shards once per session) and the suite's markers.

`slow`: the tests in SLOW (child processes, or over ~0.5 s on 2 idle cores) and any test marked
`@pytest.mark.slow`; `pytest -m "not slow"` runs the fast unit tests alone, in under a minute.
`gpu`: skipped without CUDA.
Tests that start DeepSpeed in child processes get the `deepspeed_shm_op` fixture first, so DeepSpeed's JIT build of
its CPU communication op (scripts/setup.sh normally does it) never runs inside a timed test.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")
# no wandb run in a test's child processes unless the test's config asks for one (`logging.wandb=offline` beats the
# environment): an offline run costs 3-7 s per process, over a minute of the demo test alone
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"imagenet_train": 24, "imagenet_val": 4, "coco_train": 48, "coco_val": 8, "ade_train": 48, "ade_val": 8,
         "num_classes": 4, "image_size": (64, 96)}

# Whole modules, test names (covering every parametrised case) or exact node ids. The rule: a test is slow if it
# starts child processes (the CLI, torchrun, a SLURM job) or takes over ~0.5 s on the idle 2-core machine
# (`python -m pytest -m "not slow" --durations=0 -q -p no:cacheprovider`), so that `pytest -m "not slow"` stays under
# a minute there (README "Tests"). Times below were measured under load (~1.7x the idle figure).
SLOW = {
    "tests/test_train.py",  # every test runs `pretrain train` in child processes: 7-300 s each
    "tests/test_slurm.py",  # a real SLURM cluster and `srun -n 2`
    "tests/test_submit.py",  # `pretrain submit/status` in children, most on the one-node SLURM cluster: 1-50 s each
    "tests/test_engine.py::test_ep2_matches_ep1_through_deepspeed_zero012",  # 2 ranks: 19 s
    "tests/test_engine.py::test_deepspeed_backend_trains_on_two_ranks_and_checkpoints_every_expert",  # 27 s
    "tests/test_engine.py::test_build_engine_refuses_zero0_clipping_under_ep",  # 1 s
    "tests/test_checkpoint.py::test_save_resume_bit_exact_and_single_process_export",  # 2 ranks: 17 s
    "tests/test_checkpoint.py::test_checkpoint_and_models_do_not_import_deepspeed",  # a child interpreter: 7 s
    "tests/test_expert_parallel.py::test_ep2_matches_ep1_on_two_gloo_ranks",  # 2 ranks: 20 s
    "tests/test_mixture.py::test_same_task_on_every_rank_independent_of_process_and_hash_seed",  # children: 5 s
    "tests/test_upcycle.py::test_equals_dense_timm_vit_small_under_the_condition",  # 15 s
    "tests/test_vit.py::test_sizes_match_timm_and_moe_counts[vit_l16]",  # 10 s
    "tests/test_vit.py::test_sizes_match_timm_and_moe_counts[vit_b16]",  # 1.1 s
    "tests/test_vit.py::test_dense_attention_head_dim_and_randn_task_embedding",  # 4 s
    "tests/test_harness.py::test_failed_launch_shows_every_rank",  # torchrun: ~10 s
    "tests/test_harness.py::test_timeout_kills_the_whole_process_group",  # 2 s of sleeping children
    "tests/test_runs.py::test_evaluate_never_imports_deepspeed",  # `pretrain evaluate` in a child: 27 s
    "tests/test_runs.py::test_load_run_restores_the_saved_weights",  # 1.7 s
    "tests/test_bad_input.py::test_evaluate_damaged_checkpoints",  # the CLI per damage: 12 cases, 28 s
    "tests/test_bad_input.py::test_missing_shards_and_not_a_run_dir",  # 5 s
    "tests/test_bad_input.py::test_resume_with_a_changed_config_is_refused_before_writing",  # 2.3 s
    "tests/test_drift.py::test_resume_drift_rules",  # 1.3 s
    "tests/test_decode_bad_input.py::test_damaged_pngs_kill_neither_the_process_nor_the_loaders",  # children: 16 s
    "tests/test_config.py::test_resolved_config_round_trips",  # 7 files, 7 s
    "tests/test_extract.py",  # trains and exports small runs: 1-4 s each (the keep-rule units are ms)
    "tests/test_export_file.py::test_export_needs_no_shards_once_the_run_saved_its_class_lists",  # 3 exports: 9 s
    "tests/test_dry_run.py",  # builds every shipped config's model, ViT-L ones in memory: 1-15 s each
    "tests/test_heal.py",  # extractions with DeepSpeed heals in children: 60 s
    "tests/test_extract_sweep.py",  # CLI extractions with reports: 1-30 s each (the share-rule unit is ms)
    "tests/test_export_file.py::test_files_honour_the_umask",  # export + extract: 7 s each
    "tests/test_export_file.py::test_wrong_inputs_are_one_line_and_exit_2",  # a run + five CLI calls: 8 s
    "tests/test_export_file.py::test_evaluation_says_when_damaged_images_were_skipped",  # a run + an evaluation: 8 s
    "tests/test_heads.py::test_detector_train_losses_and_eval_boxes",  # 4 s
    # 0.4 s idle, 9 s on the loaded 2-core machine
    "tests/test_sample_random.py::test_a_keyed_model_forward_is_the_same_on_one_batch_and_on_two_halves",
    "tests/test_heads.py::test_every_parameter_gets_a_gradient_over_all_tasks",  # 3.9 s
    "tests/test_heads.py::test_eval_outputs_of_cls_and_seg",  # 1.1 s
    "tests/test_decoders.py::test_every_parameter_gets_a_gradient",  # 5 decoders, 3.8 s
    "tests/test_prepare.py::test_workers_give_identical_shards",  # a forkserver pool: 1.6 s
    "tests/test_prepare_dense.py::test_dense_workers_give_identical_shards",  # a forkserver pool: 1.6 s
    "tests/test_ring.py::test_ring_batches_equal_the_dataloader_transport_even_when_all_are_held",  # 3.5 s
    "tests/test_objective.py::test_plots_draw_the_data",  # matplotlib: 3.3 s
    "tests/test_synth.py::test_same_seed_same_bytes",  # two corpora: 2.6 s
    "tests/test_edge_metrics.py::test_edges_seg2bmap_gt_sync_and_bad_input",  # 1.5 s
    "tests/test_edge_metrics.py::test_edges_partial_match_golden_and_quantisation",  # 1 s
    "tests/test_modsquad_import.py::test_vitb16_modsquad_config_has_modsquads_backbone_parameter_count",  # 1.4 s
    "tests/test_modsquad_import.py::test_imported_backbone_computes_modsquads_forward",  # 1.3 s
    "tests/test_data.py::test_two_workers_partition_eval_and_draw_distinct_train_streams",  # worker processes: 1 s
    "tests/test_prepare_dense.py::test_nyud_tree_quirks_and_members",  # 0.9 s
    "tests/test_submodel_build.py::test_every_submodel_is_a_finetuning_backbone",  # 24 cases, 0.3 s each
    "tests/test_mlore_import.py::test_import_then_finetune_init_computes_the_official_forward",  # the CLI: 6 s
    "tests/test_mlore_import.py::test_bad_checkpoints_are_one_line_and_exit_2",  # the CLI per damage: 7 cases, 1-2 s
    "tests/test_mlore_import.py::test_official_names_and_shapes_at_full_size_fit_the_shipped_configs",  # 4-7 s each
}
# Modules whose tests start a SLURM cluster (tests/cluster.py): under pytest-xdist (`.ci/run` runs the slow half with
# `-n 3 --dist loadgroup`) they go to one worker together, so one session cluster serves them all and two clusters
# never race for a job id's rendezvous port.
SLURM_MODULES = {"tests/test_slurm.py", "tests/test_submit.py", "tests/test_multinode.py"}

# Modules whose tests launch DeepSpeed in child processes (`pretrain train`, tests/dist_scripts/*).
DEEPSPEED_CHILDREN = {"tests/test_train.py", "tests/test_engine.py", "tests/test_checkpoint.py", "tests/test_slurm.py"}


def _listed(nodeid: str, table: set[str]) -> bool:
    module, _, name = nodeid.partition("::")
    return nodeid in table or module in table or f"{module}::{name.split('[')[0]}" in table


def pytest_collection_modifyitems(config, items):
    has_cuda = None
    for item in items:
        if _listed(item.nodeid, SLOW):
            item.add_marker(pytest.mark.slow)
        if _listed(item.nodeid, SLURM_MODULES):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        if _listed(item.nodeid, DEEPSPEED_CHILDREN):
            item.fixturenames.insert(0, "deepspeed_shm_op")
        if item.get_closest_marker("gpu"):
            if has_cuda is None:
                import torch

                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def deepspeed_shm_op() -> None:
    """Build DeepSpeed's `deepspeed_shm_comm` CPU op once, untimed, if scripts/setup.sh has not (a first build takes
    minutes on a loaded machine and used to time out the first multi-process test). The build runs in a child that
    imports pretrain.parallel.engine first, as every run does: the same per-environment cache and ninja
    (`engine.prepare_op_build`). The look for an existing op only saves that child (~10-20 s, mostly importing
    DeepSpeed); where it looks in the wrong place, the child runs and finds the op built."""
    from harness import run

    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")
    if (Path(cache) / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file():
        return
    code = "import pretrain.parallel.engine; from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    out = run([sys.executable, "-c", code], timeout=1800)
    assert out.returncode == 0, f"building DeepSpeed's CPU op failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """`<root>/{imagenet,coco,ade20k}/{train,val}` shard sets from the real converters over a small synth corpus."""
    from pretrain.prepare import PREPARERS
    from pretrain.synth import synthesize

    base = tmp_path_factory.mktemp("corpus")
    synthesize(base / "raw", seed=0, **SMALL)
    for name in ("imagenet", "coco", "ade20k"):
        for split in ("train", "val"):
            PREPARERS[name](base / "raw" / name, base / "shards" / name / split, split, min_shards=2,
                            max_count=32, progress=False)
    return base / "shards"


@pytest.fixture()
def cli(capsys):
    """Run `pretrain ARGV` in this process; returns (exit code, stderr). The environment (train/evaluate export
    RANK & co.) and the logging handlers (main installs its own) are restored."""
    import logging
    import os

    from pretrain.cli import main as cli_main

    env, handlers = dict(os.environ), list(logging.getLogger().handlers)

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = cli_main([str(a) for a in argv])
        finally:
            os.environ.clear()
            os.environ.update(env)
            logging.getLogger().handlers[:] = handlers
        return code, capsys.readouterr().err

    return run
