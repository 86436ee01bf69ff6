"""torch.distributed sharding: ranks from the torchrun environment, shards that partition the data,
and two real CPU processes on gloo whose eval and segment results equal the single-process ones."""
import contextlib
import json
import os
import socket
import time

import numpy as np
import pytest
import torch

from hrnet_fast.distributed import LaunchError, Ranks, rank_device, ranks_from_env


def test_no_torchrun_environment_is_one_process():
    assert ranks_from_env({}) == Ranks(0, 1, 0) and not Ranks().distributed


def test_torchrun_environment_is_read_and_checked():
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(LaunchError, match="LOCAL_RANK not set"):
        ranks_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="RANK=2, WORLD_SIZE=2"):
        ranks_from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(LaunchError, match="WORLD_SIZE='two' is not an integer"):
        ranks_from_env({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (7, 3), (3, 8)])
def test_shards_partition_the_items_without_padding(n, world):
    items = list(range(n))
    shards = [Ranks(r, world, r).shard(items) for r in range(world)]
    assert sorted(sum(shards, [])) == items  # every item exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_ranks_run_on_the_cpu_without_cuda():
    assert rank_device(Ranks(1, 2, 1), None) == torch.device("cpu")
    with pytest.raises(LaunchError, match="no CUDA GPU"):
        rank_device(Ranks(1, 2, 1), torch.device("cuda"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, args, nprocs, timeout_s):
    """Spawn ``nprocs`` processes of ``fn(rank, *args)``; a run that hangs (a rank left waiting in a
    collective) fails the test after ``timeout_s`` instead of hanging it."""
    context = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                                    start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.terminate()
            pytest.fail(f"the {nprocs} ranks did not finish in {timeout_s} s: a hang")


def _rank_main(rank, world, port, root):
    """One torchrun-like process running three CLI commands; it logs the images it decodes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import hrnet_fast.infer as infer
    from hrnet_fast.cli import main

    decoded = []
    real_getitem = infer.ImageDataset.__getitem__

    def getitem(self, index):  # --workers 0: runs in this process
        decoded[-1].append(os.path.basename(self.items[index].path))
        return real_getitem(self, index)

    infer.ImageDataset.__getitem__ = getitem
    codes = []
    with open(f"{root}/stdout{rank}.txt", "w") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        for argv in _commands(root, "dist"):
            decoded.append([])
            codes.append(main(argv))
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump({"codes": codes, "decoded": decoded}, f)


def _commands(root, tag):
    common = ["--preset", "w18_small_v1", "--num-classes", "4", "--checkpoint", f"{root}/w.pth",
              "--workers", "0", "--quiet", "--device", "cpu"]
    return [
        ["eval", "--images", f"{root}/images", "--labels", f"{root}/labels", "--json",
         f"{root}/{tag}.json"] + common,
        ["segment", f"{root}/seg_in", "--out", f"{root}/{tag}_seg"] + common,
        ["eval", "--images", f"{root}/bad/images", "--labels", f"{root}/bad/labels"] + common,
    ]


def test_two_gloo_processes_equal_one_process(tmp_path, capsys):
    from hrnet_fast import HRNet, HRNetConfig
    from hrnet_fast.cli import main
    from test_cli import _read_png
    from test_evaluate import make_dataset

    torch.manual_seed(0)
    torch.save(HRNet(HRNetConfig.preset("w18_small_v1", num_classes=4)).state_dict(), tmp_path / "w.pth")
    items = make_dataset(tmp_path, [(16, 24)] * 5, num_classes=4)  # odd count: shards of 3 and 2
    names = sorted(os.path.basename(i.path) for i in items)
    (tmp_path / "seg_in").mkdir()
    for i in items:
        (tmp_path / "seg_in" / os.path.basename(i.path)).write_bytes(open(i.path, "rb").read())
    (tmp_path / "seg_in" / "im2_broken.ppm").write_bytes(b"P6\n4 4\n255\n")  # rank 0's shard
    bad = make_dataset(tmp_path / "bad", [(16, 24)] * 2, num_classes=4)
    np.save(bad[1].label, np.zeros((16, 23), np.uint8))  # im1: rank 1's shard

    run_ranks(_rank_main, (2, _free_port(), str(tmp_path)), nprocs=2, timeout_s=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same convolution code, the same rounding
    try:
        single = [main(argv) for argv in _commands(str(tmp_path), "single")[:2]]
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()

    # Each command decoded every image exactly once across the ranks, each rank its own share.
    eval_, seg, failed = (sorted(ranks[0]["decoded"][k] + ranks[1]["decoded"][k]) for k in range(3))
    assert eval_ == names and seg == sorted(names + ["im2_broken.ppm"])
    assert ranks[0]["decoded"][0] and ranks[1]["decoded"][0]
    assert failed == ["im0.ppm", "im1.ppm"]
    # The sharded metrics equal one process's exactly; rank 0 alone wrote and printed them.
    assert json.loads((tmp_path / "dist.json").read_text()) == json.loads((tmp_path / "single.json").read_text())
    assert json.loads((tmp_path / "dist.json").read_text())["images"] == 5
    rank0, rank1 = ((tmp_path / f"stdout{r}.txt").read_text() for r in range(2))
    assert "mIoU" in rank0 and "2 ranks" in rank0 and rank1 == ""
    # segment: the same label maps as one process; the unreadable image named, exit status 3 on
    # every rank; the eval whose bad label map only rank 1 saw fails on both, reported by rank 0.
    for name in names:
        stem = name[:-4]
        assert np.array_equal(_read_png(tmp_path / "dist_seg" / f"{stem}.png"),
                              _read_png(tmp_path / "single_seg" / f"{stem}.png"))
    assert "skipped " in rank0 and "im2_broken.ppm" in rank0
    assert single == [0, 3] and ranks[0]["codes"] == ranks[1]["codes"] == [0, 3, 1]
    assert "error: rank 1 of 2 failed: DatasetError: label map" in rank0 and "im1.npy" in rank0
