"""Test set-up: an emulated 8-device CPU mesh, configured before jax is imported."""

import os

# LLVM's optimisation level 0: the suite compiles hundreds of tiny programs and runs
# each a few times, so compile time dominates (measured: the suite 1797 -> 1324 s, a
# train-step test 50 -> 34 s); the HLO and its numbers are the same within float
# rounding. Subprocesses (the CLI tests) inherit it. Benchmarks do not set it.
os.environ["XLA_FLAGS"] = (
    "--xla_backend_optimization_level=0 " + os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache, shared by the test processes and the clipjax
# subprocesses they start (which inherit the environment): the same tiny programs
# compile in many tests (a tiny train step: 14.8 s compiled, 3.3 s from the cache). It
# lives in the user's cache, not the checkout, so a fresh clone (CI) reuses what earlier
# runs compiled (make test on a quiet machine: 1057 s cold, 841 s warm). Keys are the HLO
# and the jax/jaxlib versions, so a changed program compiles anew; JAX evicts the least
# recently used entries past 2 GiB.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clipjax",
    "test-jax-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


# The end-to-end files: subprocess runs of the CLI, several processes, real peers, fresh
# installs. `make test` runs them; `make test-fast` (-m "not slow") leaves them out.
SLOW_FILES = {
    "test_install_tpu.py", "test_run_storage.py", "test_train_cli.py", "test_train_signals.py",
    "test_launch.py", "test_multislice.py", "test_curation.py", "test_clip_benchmark_parity.py",
    "test_eval_suites.py", "test_serve.py", "test_recipes.py", "test_train.py",
    "test_eval_parity.py", "test_import_parity.py", "test_papercuts.py", "test_compile.py",
    "test_tensor_parallel.py", "test_gcs_apps.py", "test_gcs_data.py",
}


# And the tests of the other files that take 10 s or more each (compiled gradients of whole
# towers): `make test` runs them, `make test-fast` leaves them out.
SLOW_TESTS = {
    "test_models.py": {
        "test_last_block_of_pooled_tokens_equals_the_full_stack",
        "test_resnet_remat_gradients_and_frozen_batch_norm_statistics",
        "test_kernel_paths_give_equal_outputs_and_gradients",
        "test_scanned_stack_with_pooled_last_block_equals_the_full_scan",
        "test_remat_policy_saves_the_same_dots_on_both_kernel_paths",
        "test_flops_agree_with_xla_cost_analysis", "test_bfloat16_compute_and_per_tower_dtype",
        "test_sharded_apply_on_mesh_matches", "test_scan_and_remat_match_unrolled",
        "test_logit_bias_and_init_values"},
    "test_inference.py": {"test_encode_images_batches_pad_and_shard",
                          "test_encode_texts_strings_and_ids"},
    "test_eval_math.py": {"test_linear_probe_solves_the_regularised_problem"},
    "test_optim.py": {"test_each_optimizer_descends_and_decays_only_masked",
                      "test_frozen_params_get_no_state_and_no_update"},
    "test_data_webdataset.py": {"test_restore_through_orbax_continues_identically"},
    "test_export.py": {"test_open_clip_round_trip"},
    "test_eval_cli.py": {"test_cli_results_cache_and_rerun"},
    "test_data_global_order.py": {
        "test_workers_and_threads_change_nothing_and_resume_across_them"},
}


# The longest files first (their warm-cache seconds in one run of the suite: 273, 118,
# 112, ...): xdist hands files to workers in collection order (`--no-loadscope-reorder`;
# by default it sorts files by their number of tests, which started the one-test 118 s
# install last), so a long file started last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_run_storage.py", "test_install_tpu.py", "test_models.py",
                 "test_train_cli.py", "test_train.py", "test_curation.py",
                 "test_train_signals.py", "test_recipes.py", "test_gcs_apps.py",
                 "test_compile.py", "test_eval_parity.py", "test_losses.py",
                 "test_clip_benchmark_parity.py", "test_inference.py", "test_eval_suites.py",
                 "test_optim.py", "test_multislice.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: rest in order


def pytest_itemcollected(item):
    slow = SLOW_TESTS.get(item.path.name, ())
    if item.path.name in SLOW_FILES or item.originalname in slow:
        item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def cli_data(tmp_path_factory):
    """Image-caption pairs (a folder, webdataset shards, a sentencepiece model)."""
    import train_cli

    return train_cli.make_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="session")
def cli_reference(tmp_path_factory, cli_data):
    """One uninterrupted `clipjax train` with `--workdir runs/ref` typed from another
    directory, augmentation on: the run every interrupted, resumed, relocated or
    multi-process run of the CLI tests must reproduce."""
    import train_cli

    cwd = tmp_path_factory.mktemp("elsewhere")
    code, out = train_cli.finish(train_cli.start(
        train_cli.reference_args("runs/ref", cli_data), cwd=str(cwd)))
    assert code == 0, out[-3000:]
    workdir = str(cwd / "runs" / "ref")
    return {"workdir": workdir, "cwd": str(cwd), "out": out,
            "rows": train_cli.local_rows(workdir), "params": train_cli.final_params(workdir),
            "ema": train_cli.final_params(workdir, which="ema")}


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real GCS API server (fake-gcs-server) for the whole session, bucket `bucket1`.

    `gcs.env()` is the environment a client needs; tests that run clipjax in this
    process use the `gcs_env` fixture, subprocess tests pass `{**os.environ, **gcs.env()}`.
    Give each test its own prefix: gs://bucket1/<test name>/...
    """
    from gcs_server import GcsServer

    server = GcsServer(tmp_path_factory.mktemp("gcs")).start()
    yield server
    server.stop()


@pytest.fixture
def gcs_env(gcs, monkeypatch):
    """This process talks to the test GCS server (gcsfs, tensorstore)."""
    for k, v in gcs.env().items():
        monkeypatch.setenv(k, v)
    return gcs

