"""Sinkhorn-Knopp and distributed KoLeo over 2 gloo ranks equal 1 process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gramline.losses import koleo_loss_distributed, sinkhorn_knopp

WORLD = 2
K = 6
DINO_N = (5, 5)  # DINO: equal halves of 2·B teacher CLS logits
IBOT_N = (3, 8)  # iBOT: ranks hold different numbers of masked patches
KOLEO_B, KOLEO_GROUP = 6, 4  # 12 samples, groups [0..3] [4..7] [8..11]: the middle one spans both ranks


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    koleo = torch.randn(WORLD * KOLEO_B, 5, generator=gen)
    koleo[6] = koleo[4] + 0.01 * torch.randn(5, generator=gen)  # sample 4's neighbour is on rank 1
    return {
        "dino": torch.randn(sum(DINO_N), K, generator=gen) * 2,
        "ibot": torch.randn(sum(IBOT_N), K, generator=gen) * 2,
        "koleo": koleo,
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = inputs()
        dino_part = data["dino"].split(DINO_N)[rank]
        ibot_part = data["ibot"].split(IBOT_N)[rank]
        n_masked = torch.tensor([ibot_part.shape[0]])
        dist.all_reduce(n_masked)  # as the DINO recipe does for iBOT's B_tot

        # the group argument is honoured: a one-rank subgroup gives the purely local answer
        solo_groups = [dist.new_group([r]) for r in range(WORLD)]

        x = data["koleo"].chunk(WORLD)[rank].clone().requires_grad_(True)
        koleo = koleo_loss_distributed(x, group_size=KOLEO_GROUP)
        koleo.backward()
        torch.save(
            {
                "dino": sinkhorn_knopp(dino_part, temp=0.07, n_iters=3),
                "ibot": sinkhorn_knopp(ibot_part, temp=0.07, n_iters=3, n_samples_total=n_masked),
                "solo": sinkhorn_knopp(dino_part, temp=0.07, group=solo_groups[rank]),
                "koleo": koleo.detach(),
                "koleo_grad": x.grad,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = inputs()

    want_dino = sinkhorn_knopp(data["dino"], temp=0.07, n_iters=3)
    assert torch.allclose(torch.cat([g["dino"] for g in got]), want_dino, atol=1e-6)

    want_ibot = sinkhorn_knopp(data["ibot"], temp=0.07, n_iters=3, n_samples_total=sum(IBOT_N))
    assert torch.allclose(torch.cat([g["ibot"] for g in got]), want_ibot, atol=1e-6)

    # the distributed answer really differs from SK on each half alone, and the subgroup gives that
    for rank, part in enumerate(data["dino"].split(DINO_N)):
        alone = sinkhorn_knopp(part, temp=0.07)
        assert torch.allclose(got[rank]["solo"], alone, atol=1e-6)
        assert not torch.allclose(got[rank]["dino"], alone, atol=1e-3)

    # KoLeo: the mean of the ranks' losses is the single-process grouped loss over all samples,
    # and each rank's gradient is that of the sum of all ranks' losses (= WORLD × the mean's)
    x = data["koleo"].clone().requires_grad_(True)
    want_koleo = koleo_loss_distributed(x, group_size=KOLEO_GROUP)
    want_koleo.backward()
    assert torch.allclose(torch.stack([g["koleo"] for g in got]).mean(), want_koleo, atol=1e-6)
    for rank, half in enumerate(data["koleo"].chunk(WORLD)):  # the spanning group matters
        assert abs(got[rank]["koleo"].item() - koleo_loss_distributed(half, KOLEO_GROUP).item()) > 1e-4
    assert torch.allclose(torch.cat([g["koleo_grad"] for g in got]), WORLD * x.grad, atol=1e-5)
