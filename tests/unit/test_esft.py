"""ESFT on tiny random MoE models of every supported architecture (CPU, seconds): the
routing scores against a direct computation, expert selection, freezing all but the
selected experts through real AdamW steps, and exporting the result (whole and as a delta).

Expected values are computed here independently of the code under test (plain loops over
the routing captured by our own hooks; model sizes from the config)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from tests.fixtures.tiny_moe import ARCHITECTURES, build_tiny_moe  # noqa: E402
from trainers import esft_params, moe  # noqa: E402

EXPERTS, TOP_K, MOE_LAYERS = 8, 2, 2  # tiny_moe's defaults
SELECTED = [1, 4]  # experts trained in every MoE layer
# The decoder layers that are MoE in tiny_moe: DeepSeek-V3 has a dense first layer.
MOE_LAYER_INDEX = {"qwen3_moe": [0, 1], "qwen2_moe": [0, 1], "deepseek_v3": [1, 2], "mixtral": [0, 1]}
SHARED = {"qwen2_moe": ("mlp.shared_expert.", "mlp.shared_expert_gate."), "deepseek_v3": ("mlp.shared_experts.",)}
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Each architecture's tiny model saved once for the module."""
    return {arch: build_tiny_moe(tmp_path_factory.mktemp(arch), arch) for arch in ARCHITECTURES}


def load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def random_ids(rows, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, length), generator=g)  # no special tokens


# ---------------------------------------------------------------- routing scores

class Capture:
    """Our own record of what each MoE layer's Experts module was given: a forward hook
    (not a pre-hook, as RoutingStats uses) keeping (top_k_index, top_k_weights) per call."""

    def __init__(self, model):
        self.calls = [[] for _ in moe.moe_layers(model)]
        self.hooks = [layer.experts.register_forward_hook(self._hook(i))
                      for i, layer in enumerate(moe.moe_layers(model))]

    def _hook(self, i):
        def keep(module, args, output):
            self.calls[i].append((args[1].detach().clone(), args[2].detach().clone()))
        return keep

    def remove(self):
        for h in self.hooks:
            h.remove()


def expected_scores(calls, forwards):
    """Both score tables by the paper's definitions, in plain Python.

    calls: per layer, per forward (index (N, K), weights (N, K)); forwards: per forward,
    its examples as lists of flat token positions (padding left out)."""
    tables = {"gate": [], "token": []}
    for layer_calls in calls:
        gate_sum, token_sum, n_examples = [0.0] * EXPERTS, [0.0] * EXPERTS, 0
        for (index, weights), examples in zip(layer_calls, forwards, strict=True):
            k = index.shape[1]
            for positions in examples:
                n_examples += 1
                length = len(positions)
                gate, token = [0.0] * EXPERTS, [0.0] * EXPERTS
                for t in positions:
                    for j in range(k):
                        e = int(index[t, j])
                        gate[e] += float(weights[t, j])
                        token[e] += 1.0 / k
                for e in range(EXPERTS):
                    gate_sum[e] += gate[e] / length
                    token_sum[e] += token[e] / length
        for name, sums in (("gate", gate_sum), ("token", token_sum)):
            mean = [s / n_examples for s in sums]
            total = sum(mean)
            tables[name].append([m / total for m in mean])
    return tables


def assert_tables_close(got, want, atol=1e-9):
    assert len(got) == len(want)
    for row_got, row_want in zip(got, want):
        assert row_got == pytest.approx(row_want, abs=atol, rel=0)


def padded_batch(vocab):
    """3 rows x 16 tokens, the middle one right-padded after 11 tokens."""
    ids = random_ids(3, 16, vocab, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = 0  # pad id: whatever it is, those tokens must not count
    examples = [list(range(0, 16)), list(range(16, 16 + 11)), list(range(32, 48))]
    return {"input_ids": ids, "attention_mask": mask}, examples


def packed_batch(vocab):
    """2 rows x 16 tokens as data.pack lays them out: row 0 holds two examples (9 + 7
    tokens), row 1 one example of 12 tokens and 4 of padding (continuing its seq id)."""
    ids = random_ids(2, 16, vocab, seed=2)
    seq_ids = torch.tensor([[0] * 9 + [1] * 7, [0] * 16], dtype=torch.int32)
    position_ids = torch.tensor([list(range(9)) + list(range(7)), list(range(16))])
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    examples = [list(range(0, 9)), list(range(9, 16)), list(range(16, 28))]
    return {"input_ids": ids, "position_ids": position_ids}, seq_ids, mask, examples


def test_sample_ids_by_hand():
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert moe.sample_ids(ids, mask).tolist() == [0, 0, 0, -1, 1, 1, 1, 1]
    seq = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # row 1's segments follow row 0's two: 2, 3, 4; its last token is padding
    assert moe.sample_ids(ids, mask, seq).tolist() == [0, 0, 1, 1, 2, 3, 4, -1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_moe_layers_are_the_decoder_layers_experts(base_dirs, arch):
    model = load(base_dirs[arch])
    layers = moe.moe_layers(model)
    assert [layer.index for layer in layers] == MOE_LAYER_INDEX[arch]
    for layer in layers:
        assert layer.experts is model.model.layers[layer.index].mlp.experts
        assert layer.num_experts == EXPERTS


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_equal_a_direct_computation(base_dirs, arch):
    model = load(base_dirs[arch])
    vocab = model.config.vocab_size
    padded, padded_examples = padded_batch(vocab)
    packed, seq_ids, packed_mask, packed_examples = packed_batch(vocab)

    def run(batches):
        """RoutingStats and our capture over the same forwards."""
        stats, capture = moe.RoutingStats(model), Capture(model)
        with torch.no_grad():
            for inputs, ids in batches:
                stats.set_batch(ids)
                model(**inputs, use_cache=False)
        stats.remove()
        capture.remove()
        return stats, capture

    padded_ids = moe.sample_ids(padded["input_ids"], padded["attention_mask"])
    packed_ids = moe.sample_ids(packed["input_ids"], packed_mask, seq_ids)
    cases = {
        "padded": ([(padded, padded_ids)], [padded_examples]),
        "packed": ([(packed, packed_ids)], [packed_examples]),
        # both forwards into one RoutingStats: a mean over all 6 examples
        "both": ([(padded, padded_ids), (packed, packed_ids)], [padded_examples, packed_examples]),
    }
    for name, (batches, forwards) in cases.items():
        stats, capture = run(batches)
        assert all(len(c) == len(batches) for c in capture.calls), name
        want = expected_scores(capture.calls, forwards)
        got = stats.scores()
        assert_tables_close(got["gate"], want["gate"])
        assert_tables_close(got["token"], want["token"])
        assert int(stats.examples) == sum(len(f) for f in forwards), name
        assert int(stats.tokens) == sum(len(ex) for f in forwards for ex in f), name
        for table in got.values():  # normalised per layer
            assert all(abs(sum(row) - 1) < 1e-9 for row in table)
    assert stats._hooks == [] and all(not layer.experts._forward_pre_hooks for layer in stats.layers)


def test_padding_changes_nothing(base_dirs):
    """The padded row's scores with its padding tokens replaced by anything else are the
    same: padding is left out, not counted as tokens routed somewhere."""
    model = load(base_dirs["qwen3_moe"])
    padded, _ = padded_batch(model.config.vocab_size)
    results = []
    for fill in (0, 7):
        inputs = {k: v.clone() for k, v in padded.items()}
        inputs["input_ids"][1, 11:] = fill
        stats = moe.RoutingStats(model)
        stats.set_batch(moe.sample_ids(inputs["input_ids"], inputs["attention_mask"]))
        with torch.no_grad():
            model(**inputs, use_cache=False)
        stats.remove()
        results.append(stats.scores())
    for name in ("gate", "token"):  # float32 noise from the other tokens' values, nothing more
        assert_tables_close(results[0][name], results[1][name], atol=1e-6)


def test_deepseek_routing_is_not_softmax_topk(base_dirs):
    """Why routing is read at the Experts module: softmax top-k over DeepSeek-V3's router
    logits (what one would recompute) picks other experts than its group-limited routing."""
    model = load(base_dirs["deepseek_v3"])
    logits = []
    hooks = [layer.block.gate.register_forward_hook(lambda m, a, out: logits.append(out[0].detach()))
             for layer in moe.moe_layers(model)]
    capture = Capture(model)
    padded, _ = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        model(**padded, use_cache=False)
    for h in hooks:
        h.remove()
    capture.remove()
    differ = 0
    for layer_logits, [(index, _)] in zip(logits, capture.calls, strict=True):
        recomputed = torch.softmax(layer_logits.float(), -1).topk(TOP_K, dim=-1).indices
        differ += int((recomputed.sort(-1).values != index.sort(-1).values).any(-1).sum())
    if differ == 0:  # possible in principle: every token's top 2 in one group (chance ~0.4 per token)
        pytest.skip("softmax top-k happened to match group-limited routing on every token")
    assert differ > 0


# ---------------------------------------------------------------- selection

def test_select_experts_cumulative_threshold():
    table = [[0.5, 0.3, 0.1, 0.1]]
    assert moe.select_experts(table, 0.6) == [[0, 1]]  # 0.5 < 0.6: the expert crossing it is included
    assert moe.select_experts(table, 0.5) == [[0]]  # reached exactly: no more
    assert moe.select_experts(table, 0.85) == [[0, 1, 2]]
    assert moe.select_experts(table, 1.0) == [[0, 1, 2, 3]]


def test_select_experts_ties_caps_order_and_layers():
    assert moe.select_experts([[0.25] * 4], 0.3) == [[0, 1]]  # ties: lower index first
    assert moe.select_experts([[0.25] * 4], 0.6) == [[0, 1, 2]]
    # highest scores first, returned sorted by index
    assert moe.select_experts([[0.1, 0.2, 0.05, 0.4, 0.25]], 0.8) == [[1, 3, 4]]
    # at most max_per_layer, the best ones
    assert moe.select_experts([[0.1, 0.2, 0.05, 0.4, 0.25]], 0.99, max_per_layer=2) == [[3, 4]]
    assert moe.select_experts([[0.1, 0.2, 0.05, 0.4, 0.25]], 0.3, max_per_layer=3) == [[3]]
    # each layer on its own
    layers = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]]
    assert moe.select_experts(layers, 0.75) == [[0, 1], [0, 3], [0, 1, 2]]


# ---------------------------------------------------------------- supported models

def test_check_supported():
    with pytest.raises(ValueError) as err:
        moe.check_supported({"model_type": "llama"})
    assert "llama" in str(err.value)
    for name in ("qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral"):
        assert name in str(err.value)
    with pytest.raises(ValueError):
        moe.check_supported(AutoConfig.for_model("llama"))  # a config object as well
    with pytest.raises(ValueError):
        moe.check_supported({})
    for name in ("qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral"):
        assert moe.check_supported({"model_type": name}) == name
        assert moe.check_supported(AutoConfig.for_model(name)) == name


# ---------------------------------------------------------------- training the selected experts

def per_expert_numel(config):
    """gate_up (2I x H) + down (H x I) of one routed expert, from the config alone."""
    inter = config.intermediate_size if config.model_type == "mixtral" else config.moe_intermediate_size
    return 3 * config.hidden_size * inter


def train(base_dir, arch, train_shared_experts=False):
    """3 AdamW steps (weight decay on) on the LM loss after make_selected_trainable."""
    model = load(base_dir)
    model.train()
    counts = esft_params.make_selected_trainable(model, [SELECTED] * MOE_LAYERS,
                                                 train_shared_experts=train_shared_experts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = random_ids(2, 16, model.config.vocab_size, seed=3)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return {"model": model, "opt": opt, "counts": counts}


@pytest.fixture(scope="module")
def trained(base_dirs):
    """Trained models, once per (architecture, train_shared_experts)."""
    cache = {}

    def get(arch, train_shared_experts=False):
        key = (arch, train_shared_experts)
        if key not in cache:
            cache[key] = train(base_dirs[arch], arch, train_shared_experts)
        return cache[key]
    return get


def expert_key(key):
    """(tensor name) when `key` is a fused routed-expert tensor, else None."""
    for name in EXPERT_TENSORS:
        if key.endswith(f"mlp.experts.{name}"):
            return name
    return None


def check_frozen_and_trained(base, merged, changed_prefixes=()):
    """Selected expert slices changed, every other slice and tensor bitwise as in `base`,
    but the tensors under `changed_prefixes` (trained whole), which changed."""
    assert set(merged) == set(base)  # the model's own layout again
    seen = {"router": 0, "attention": 0, "embed": 0, "norm": 0, "lm_head": 0, "experts": 0}
    for key, before in base.items():
        after = merged[key]
        assert after.shape == before.shape and after.dtype == before.dtype, key
        if expert_key(key):
            seen["experts"] += 1
            for e in range(EXPERTS):
                same = torch.equal(after[e], before[e])
                assert same != (e in SELECTED), f"{key}[{e}] {'unchanged' if same else 'changed'}"
        elif any(p in key for p in changed_prefixes):
            assert not torch.equal(after, before), f"{key} was trained but did not change"
        else:
            assert torch.equal(after, before), f"{key} changed"
            seen["router"] += ".mlp.gate." in key
            seen["attention"] += "self_attn" in key
            seen["embed"] += "embed_tokens" in key
            seen["norm"] += "norm" in key
            seen["lm_head"] += "lm_head" in key
    assert all(seen.values()), seen  # every kind of tensor was checked


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_selected_experts_train(base_dirs, trained, arch):
    run = trained(arch)
    model, opt, counts = run["model"], run["opt"], run["counts"]
    base = load(base_dirs[arch]).state_dict()
    merged = esft_params.merged_state_dict(model.state_dict())
    check_frozen_and_trained(base, merged)  # routers, attention, embeddings, norms, lm_head, shared: as they were

    # The optimizer holds state for exactly the `selected` slices, 2 experts each.
    selected = {name: p for name, p in model.named_parameters() if name.endswith(".selected")}
    assert sorted(selected) == sorted(
        f"model.layers.{j}.mlp.experts.esft_slices.{t}.selected" for j in MOE_LAYER_INDEX[arch] for t in EXPERT_TENSORS)
    assert {id(p) for p in opt.state} == {id(p) for p in selected.values()}
    for p in selected.values():
        assert p.shape[0] == len(SELECTED)
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(selected)

    expected = len(SELECTED) * per_expert_numel(model.config) * MOE_LAYERS
    assert counts["trainable"] == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert counts["total"] == sum(p.numel() for p in load(base_dirs[arch]).parameters())


@pytest.mark.parametrize("arch", sorted(SHARED))
def test_shared_experts_train_routers_do_not(base_dirs, trained, arch):
    run = trained(arch, train_shared_experts=True)
    model = run["model"]
    base = load(base_dirs[arch]).state_dict()
    merged = esft_params.merged_state_dict(model.state_dict())
    # the shared experts (and Qwen2-MoE's shared-expert gate) changed; routers are in the
    # "unchanged" part of the check
    check_frozen_and_trained(base, merged, changed_prefixes=SHARED[arch])
    shared_numel = sum(t.numel() for k, t in base.items() if any(p in k for p in SHARED[arch]))
    expected = len(SELECTED) * per_expert_numel(model.config) * MOE_LAYERS + shared_numel
    assert run["counts"]["trainable"] == expected


def test_train_non_expert_modules(base_dirs):
    """With train_non_expert_modules, everything but the routed experts, the routers and the
    shared experts trains (no training step needed: requires_grad says it)."""
    model = load(base_dirs["deepseek_v3"])
    esft_params.make_selected_trainable(model, [SELECTED] * MOE_LAYERS, train_non_expert_modules=True)
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            want = name.endswith(".selected")
        elif ".mlp.gate." in name or any(s in name for s in SHARED["deepseek_v3"]):
            want = False
        else:  # attention, norms, embeddings, lm_head, the dense first layer's MLP
            want = True
        assert p.requires_grad == want, name


def test_scores_document():
    doc = json.loads(moe.scores_document({"gate": [[0.5, 0.5]], "token": [[0.25, 0.75]]}, [1], 3, 40))
    assert doc == {"layers": [1], "examples": 3, "tokens": 40, "gate": [[0.5, 0.5]], "token": [[0.25, 0.75]]}


def test_selection_is_checked(base_dirs):
    model = load(base_dirs["qwen3_moe"])
    with pytest.raises(ValueError, match="layers"):
        esft_params.make_selected_trainable(model, [SELECTED])  # one layer of two
    with pytest.raises(ValueError, match="out of range"):
        esft_params.make_selected_trainable(load(base_dirs["qwen3_moe"]), [[0, EXPERTS], [1]])


# ---------------------------------------------------------------- export and delta

def logits(model, vocab):
    ids = random_ids(2, 16, vocab, seed=4)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch,shared", [(a, False) for a in ARCHITECTURES] + [("qwen2_moe", True)])
def test_export_and_delta(base_dirs, trained, tmp_path, arch, shared):
    base_dir = base_dirs[arch]
    model = trained(arch, shared)["model"]
    vocab = model.config.vocab_size
    merged = esft_params.merged_state_dict(model.state_dict())

    # The whole model in its own layout: loads into a plain model, saves, reloads.
    export = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    export.load_state_dict(merged)  # strict: no key left over or missing
    export.save_pretrained(tmp_path / "export")
    exported = load(tmp_path / "export")
    want = logits(model, vocab)
    got = logits(exported, vocab)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    # As checkpoint.export does it: the split model itself saved with the merged state dict.
    model.save_pretrained(tmp_path / "direct", state_dict=merged)
    assert torch.equal(logits(load(tmp_path / "direct"), vocab), got)

    # The delta: only the selected slices (and what else was trained), applied to the base.
    tensors, selection = esft_params.delta_tensors(model.state_dict(), model)
    fused = {f"model.layers.{j}.mlp.experts.{t}" for j in MOE_LAYER_INDEX[arch] for t in EXPERT_TENSORS}
    assert selection == {k: SELECTED for k in fused}
    shared_keys = {k for k, p in model.named_parameters() if p.requires_grad and ".esft_slices." not in k}
    assert set(tensors) == fused | shared_keys
    assert bool(shared_keys) == shared
    for key in fused:
        assert torch.equal(tensors[key], merged[key][SELECTED])
    delta = tmp_path / "experts.safetensors"
    esft_params.save_delta(str(delta), tensors, selection, str(base_dir))
    loaded, loaded_selection, base_model = esft_params.load_delta(str(delta))
    assert loaded_selection == selection and base_model == str(base_dir)
    assert set(loaded) == set(tensors)

    esft_params.apply_delta_to_dir(str(base_dir), str(delta), str(tmp_path / "applied"))
    applied = load(tmp_path / "applied")
    assert torch.equal(logits(applied, vocab), got)  # bitwise the exported model
    exported_state = exported.state_dict()
    for key, value in applied.state_dict().items():
        assert torch.equal(value, exported_state[key]), key
    assert (tmp_path / "applied" / "tokenizer_config.json").exists()


def test_load_delta_rejects_other_files(base_dirs):
    with pytest.raises(ValueError, match="esft_selection"):
        esft_params.load_delta(str(base_dirs["qwen3_moe"] / "model.safetensors"))


def test_apply_delta_rejects_unknown_tensor(base_dirs):
    model = load(base_dirs["qwen3_moe"])
    with pytest.raises(ValueError, match="not in the model"):
        esft_params.apply_delta(model, {"model.layers.9.mlp.experts.down_proj": torch.zeros(1)}, {})


# ---------------------------------------------------------------- plot

def test_plot_scores_writes_png(tmp_path):
    path = tmp_path / "gate.png"
    table = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]
    moe.plot_scores(table, [1, 2], "gate score", str(path), selection=[[0, 1], [3]])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_resuming_a_checkpoint_without_its_selection_is_a_user_error(tmp_path):
    """checkpoint.resume naming a non-ESFT run's checkpoint: one line naming the missing file,
    raised on the driver before any worker starts."""
    from trainers import esft
    from trainers.user_errors import JobUserError

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    with pytest.raises(JobUserError, match=r"checkpoint.resume: .*run/esft/selection.json is missing"):
        esft.check_resumable(str(ckpt))
    (tmp_path / "run" / "esft").mkdir()
    (tmp_path / "run" / "esft" / "selection.json").write_text("{}")
    with pytest.raises(JobUserError, match="scores.json is missing"):
        esft.check_resumable(str(ckpt))
    (tmp_path / "run" / "esft" / "scores.json").write_text("{}")
    esft.check_resumable(str(ckpt))
