"""WISEConfig validation and EasyEdit YAML import; TIES merging; routing scores and per-sequence routes."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.editing import WISEConfig
from hf_longmem.editing.merging import merge_task_vectors, sparsify
from hf_longmem.editing.routing import MAIN, activation_scores, choose_routes, context_from_call, token_scores

# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_defaults_are_easyedit_llama():
    config = WISEConfig()
    assert (config.edit_lr, config.n_iter, config.act_margin, config.act_ratio) == (1.0, 70, (5.0, 20.0, 10.0), 0.88)
    assert (config.mask_ratio, config.save_freq, config.merge_freq, config.merge_alg) == (0.2, 500, 1000, "ties")
    assert (config.densities, config.weights, config.norm_constraint, config.retrieve) == (0.53, 1.0, 1.0, True)
    assert (config.alpha, config.beta, config.gamma, config.shards_per_merge) == (5.0, 20.0, 10.0, 2)
    assert WISEConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"edit_lr": 0}, "edit_lr"),
        ({"n_iter": 0}, "n_iter"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"save_freq": 3, "merge_freq": 4}, "merge_freq"),
        ({"act_margin": (1, 2)}, "act_margin"),
        ({"merge_alg": "slerp"}, "merge_alg"),
        ({"routing_score": "cosine"}, "routing_score"),
        ({"route_on_generate": "never"}, "route_on_generate"),
        ({"context_templates": ["no placeholder"]}, "context_templates"),
        ({"norm_constraint": -1.0}, "norm_constraint"),
        ({"target_module": "x", "layer": 1}, "target_module or layer"),
        ({"densities": 0.0}, "densities"),
    ],
)
def test_bad_config_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WISEConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown WISEConfig keys"):
        WISEConfig.from_dict({"edit_lr": 1.0, "lr": 2.0})


def test_from_easyedit_yaml(tmp_path):
    path = tmp_path / "llama3-8b.yaml"
    path.write_text(
        "alg_name: WISE\nmodel_name: ./hugging_cache/llama-3-8b\ndevice: 0\nmask_ratio: 0.2\nedit_lr: 0.9\n"
        "n_iter: 30\nnorm_constraint: 1.0\nact_margin: [2.0, 20.0, 10.0]\nact_ratio: 0.5\nsave_freq: 500\n"
        "merge_freq: 1000\nmerge_alg: 'ties'\nobjective_optimization: 'only_label'\n"
        "inner_params:\n- model.layers[29].mlp.down_proj.weight\nweights: 1.0\ndensities: 0.53\nretrieve: True\n"
        "replay: False\nsave_path: null\nload_path: null\nbatch_size: 1\nmax_length: 30\n"
    )
    config = WISEConfig.from_easyedit_yaml(path, retrieve=False)
    assert config.target_module == "model.layers.29.mlp.down_proj"
    assert (config.edit_lr, config.n_iter, config.act_margin, config.act_ratio) == (0.9, 30, (2.0, 20.0, 10.0), 0.5)
    assert config.retrieve is False
    path.write_text("replay: True\nretrieve: True\n")
    assert WISEConfig.from_easyedit_yaml(path).replay is True
    assert WISEConfig.from_easyedit_yaml(path, retrieve=False).replay is False  # EasyEdit ignores it in merge mode
    path.write_text("objective_optimization: 'target_new'\n")
    with pytest.raises(ValueError, match="only_label"):
        WISEConfig.from_easyedit_yaml(path)


# ---------------------------------------------------------------------------------------------------------------------
# Merging


def test_ties_keeps_disjoint_shards_exactly_and_elects_signs():
    base = torch.zeros(2, 4)
    a = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    b = torch.tensor([[0.0, 3.0, -1.0, 0.0], [0.0, 0.0, 0.0, -3.0]])
    merged = merge_task_vectors(base, [a, b], [0.5, 0.5], algorithm="ties", density=1.0)
    # disjoint entries keep their value; (0, 2): +2 vs -1 -> positive sum wins, only +2 kept; (1, 3): mean of agreeing
    assert torch.equal(merged, torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, -2.0]]))


def test_ties_is_relative_to_base_and_sparsifies_by_magnitude():
    base = torch.full((1, 4), 10.0)
    shard = base + torch.tensor([[4.0, -3.0, 0.5, 0.1]])
    merged = merge_task_vectors(base, [shard], [1.0], algorithm="ties", density=0.5)
    assert torch.equal(merged, torch.tensor([[14.0, 7.0, 10.0, 10.0]]))


def test_linear_averages_all_shards_and_dare_is_seeded():
    base = torch.zeros(3, 3)
    shards = [torch.full((3, 3), v) for v in (1.0, 2.0, 6.0)]
    assert torch.allclose(merge_task_vectors(base, shards, [1, 1, 1], algorithm="linear"), torch.full((3, 3), 3.0))
    x = torch.randn(50, 50)
    one = sparsify(x, 0.5, "rescaled_random", torch.Generator().manual_seed(0))
    two = sparsify(x, 0.5, "rescaled_random", torch.Generator().manual_seed(0))
    assert torch.equal(one, two) and 0.3 < (one != 0).float().mean() < 0.7


def test_merge_errors():
    with pytest.raises(ValueError, match="algorithm"):
        merge_task_vectors(torch.zeros(2), [torch.zeros(2)], [1.0], algorithm="slerp")
    with pytest.raises(ValueError, match="weights"):
        merge_task_vectors(torch.zeros(2), [torch.zeros(2)], [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        merge_task_vectors(torch.zeros(2), [torch.zeros(3)], [1.0])


# ---------------------------------------------------------------------------------------------------------------------
# Routing


def test_scores_ignore_padding_and_max_pool_long_sequences():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(activation_scores(per_token, mask), torch.tensor([2.0, 4.0]))
    assert torch.allclose(activation_scores(per_token, mask, max_pool_above=2), torch.tensor([2.0, 8.0]))
    main, side = torch.zeros(1, 1, 2), torch.tensor([[[3.0, 4.0]]])
    assert token_scores(main, side, None).item() == pytest.approx(5.0)
    assert token_scores(main, side, torch.relu).item() == pytest.approx(5.0)


def test_choose_routes_top1_eligible_per_sequence():
    scores = torch.tensor([[5.0, 1.0, 9.0, 2.0], [7.0, 0.5, 3.0, 2.5]])  # (K=2 memories, B=4 sequences)
    thresholds = torch.tensor([4.0, 2.0])
    assert choose_routes(scores, thresholds).tolist() == [1, MAIN, 0, 1]
    assert choose_routes(torch.zeros(0, 3), torch.zeros(0)).tolist() == [MAIN] * 3


def test_context_from_call_reads_mask_and_cache():
    from transformers import DynamicCache

    mask = torch.ones(2, 5, dtype=torch.long)
    cache = DynamicCache()
    context = context_from_call(
        ("input_ids", "attention_mask"), (torch.zeros(2, 5),), {"attention_mask": mask, "cache": cache}
    )
    assert context.attention_mask is mask and not context.continuation and context.cache() is cache
    cache.update(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4), 0)
    assert context_from_call(("input_ids",), (), {"past_key_values": cache}).continuation
