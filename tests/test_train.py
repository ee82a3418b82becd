"""DPO / KTO / SFT (RFT) rounds on the real SmolLM2-135M-Instruct (loop/training/update.py): a few steps on short
sequences, CPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel, load_peft_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from loop.generation.adapter_check import probe_logprobs
from loop.models.resolve import resolve_model
from loop.pairs import PairsConfig, PreferencePair, rft_samples
from loop.records import Graded, Segment, Trajectory
from loop.training.config import TrainConfig, TrainingDiverged
from loop.training.update import train_round

pytestmark = pytest.mark.slow

# Short sequences and few steps keep each round to a few seconds on CPU.
FAST = dict(lr=1e-3, per_device_batch_size=2, max_length=128)


@pytest.fixture(scope="module")
def model_path() -> Path:
    return Path(resolve_model("smollm2-135m-instruct").path)


@pytest.fixture(scope="module")
def tok(model_path):
    return AutoTokenizer.from_pretrained(model_path)


def traj(tok, task: str, sample: int, parts: list[tuple[str, str]]) -> Trajectory:
    prompt = tok.encode(f"Question: what is {task}? Answer:", add_special_tokens=False)
    segments = [Segment(kind, text, tok.encode(text, add_special_tokens=False)) for kind, text in parts]
    return Trajectory(task, sample, prompt, segments)


def pair(tok, task: str, chosen: list[tuple[str, str]], rejected: list[tuple[str, str]]) -> PreferencePair:
    c, r = traj(tok, task, 0, chosen), traj(tok, task, 1, rejected)
    return PreferencePair(task, c.prompt_token_ids, c, r, "random")


def tool_pair(tok, task: str, answer: str, wrong: str) -> PreferencePair:
    return pair(tok, task, [("model", f" ```python\nprint({task})\n```"),
                            ("observation", f"\n```output\n{answer}\n```\n"), ("model", f" It is {answer}.")],
                [("model", f" It is {wrong}.")])


@pytest.fixture(scope="module")
def pairs(tok) -> list[PreferencePair]:
    return [tool_pair(tok, "2+3", "5", "6"), tool_pair(tok, "4*5", "20", "9"),
            tool_pair(tok, "7-1", "6", "8"), tool_pair(tok, "9/3", "3.0", "27")]


@pytest.fixture(scope="module")
def first_round(model_path, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("round1") / "adapter"
    # One batch of all four pairs, two epochs: step 1 sees every pair with the policy still equal to the base.
    return train_round(model_path, pairs, TrainConfig(**{**FAST, "per_device_batch_size": 4, "epochs": 2}),
                       init_adapter=None, out_dir=out)


def lora_weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_peft_weights(str(adapter))


def test_dpo_round_trains_a_loadable_adapter(first_round, model_path, pairs):
    first_round_pairs = pairs
    res = first_round
    assert sorted(p.name for p in res.adapter_dir.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "ratchet_probe.json", "ratchet_train.json"]
    assert not any(p.name.startswith(".") for p in res.adapter_dir.parent.iterdir())  # no partial/old dirs left
    m = res.metrics
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["train/steps"] == 2 and m["train/examples"] == 4
    assert m["train/loss_first"] == pytest.approx(math.log(2), abs=1e-6)  # fresh LoRA: policy == reference
    assert m["train/loss_last"] < m["train/loss_first"]
    assert m["train/tokens"] > 0 and m["train/tokens_per_s"] > 0 and m["train/observation_tokens"] > 0
    for key in ("train/reward_accuracy", "train/reward_margin", "train/logps_chosen", "train/logps_rejected",
                "train/ref_logps_chosen", "train/ref_logps_rejected", "train/time_s"):
        assert key in m

    # Trained: the zero-initialised LoRA B matrices moved.
    weights = lora_weights(res.adapter_dir)
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert b and any(w.abs().max() > 0 for w in b)

    # Loadable by peft on the base model, onto modules the model really has, and it changes the model's output.
    config = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    assert set(config["target_modules"]) <= names and "lm_head" not in config["target_modules"]
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base(x).logits
        loaded = PeftModel.from_pretrained(base, res.adapter_dir)
        after = loaded(x).logits
    assert not torch.allclose(before, after)

    # The probe record (what vLLM's adapter check compares with): a text it trained on, as the trained model
    # scored it, with and without the adapter; the saved folder reproduces it.
    probe = json.loads((res.adapter_dir / "ratchet_probe.json").read_text())
    p = first_round_pairs[0].chosen
    assert probe["token_ids"] == (p.prompt_token_ids + p.completion_token_ids)[-128:]
    base_lp, tuned_lp = probe_logprobs(loaded, probe["token_ids"])
    assert probe["adapter_logprobs"] == pytest.approx(tuned_lp, abs=1e-4)
    assert probe["base_logprobs"] == pytest.approx(base_lp, abs=1e-4)
    assert probe["adapter_logprobs"] != pytest.approx(probe["base_logprobs"], abs=1e-3)


def masked_logp(model, t: Trajectory, mask: list[int]) -> float:
    """Sum of the log-probs of the completion tokens where mask is 1, with every token as context."""
    ids = torch.tensor([t.prompt_token_ids + t.completion_token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    token_logps = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
    return float((token_logps * torch.tensor([0] * len(t.prompt_token_ids) + mask)[1:]).sum())


def test_logps_are_model_tokens_only_with_observations_as_context(first_round, pairs, model_path):
    # The observation sits in the middle: context for the final model turn, but no score of its own. At step 1 the
    # policy is the base model, so TRL's logps must equal this direct computation.
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    step1 = first_round.history[0]
    for side in ("chosen", "rejected"):
        trajs = [getattr(p, side) for p in pairs]
        masked = sum(masked_logp(base, t, t.completion_mask) for t in trajs) / len(trajs)
        assert step1[f"logps/{side}"] == pytest.approx(masked, abs=1e-3)
    unmasked = sum(masked_logp(base, p.chosen, [1] * len(p.chosen.completion_mask)) for p in pairs) / len(pairs)
    assert abs(unmasked - step1["logps/chosen"]) > 1.0  # the check can tell masked from unmasked


def one_step(model_path, data, tmp_path, name, **cfg):
    cfg = {**FAST, "per_device_batch_size": len(data) if cfg.get("algorithm") != "kto" else 2, **cfg}
    res = train_round(model_path, data, TrainConfig(**cfg), init_adapter=None, out_dir=tmp_path / name)
    return res, lora_weights(res.adapter_dir)


def as_graded(p: PreferencePair) -> list[Graded]:
    return [Graded(p.chosen, "correct", None, ""), Graded(p.rejected, "incorrect", None, "")]


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_observation_tokens_do_not_move_the_loss(model_path, tok, tmp_path, algorithm):
    # Trajectories that end in an observation (a tool budget ran out): the observation is context for nothing,
    # so with masking its contents cannot change any log-prob, the loss or the update.
    def make(answer: str = " It is 5.", shift: int = 0) -> PreferencePair:
        p = pair(tok, "2+3", [("model", answer), ("observation", "\n```output\n5\n```")],
                 [("model", " It is 6."), ("observation", "\n```output\n6\n```")])
        for t in (p.chosen, p.rejected):  # other observation contents, same length
            t.segments[-1].token_ids = [i + shift for i in t.segments[-1].token_ids]
        return p

    a, a2 = make(), make(shift=7)
    assert a.chosen.completion_token_ids != a2.chosen.completion_token_ids
    b = make(answer=" It is 7.")  # one model token differs

    data = (lambda p: [p]) if algorithm == "dpo" else as_graded
    keys = ("loss", "logps/chosen", "logps/rejected")
    (ra, wa), (ra2, wa2), (rb, wb) = (one_step(model_path, data(p), tmp_path, n, algorithm=algorithm, epochs=1)
                                      for p, n in ((a, "a"), (a2, "a2"), (b, "b")))
    first = [r.history[0] for r in (ra, ra2, rb)]
    for k in keys:
        assert first[0][k] == pytest.approx(first[1][k], abs=1e-5), k
    assert first[0]["logps/chosen"] != pytest.approx(first[2]["logps/chosen"], abs=1e-3)
    assert all(torch.allclose(wa[k], wa2[k], atol=1e-7) for k in wa)
    assert not all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert ra.metrics["train/observation_tokens"] > 0


def test_ipo_with_nll_term(model_path, pairs, tmp_path):
    # At step 1 (policy == reference) IPO is (0 - 1/(2 beta))^2 and the RPO term is the chosen model tokens' mean NLL.
    p = pairs[0]
    res, _ = one_step(model_path, [p], tmp_path, "ipo", loss="ipo", nll_coef=0.5, beta=0.1)
    step1 = res.history[0]
    nll = -step1["logps/chosen"] / p.chosen.num_model_tokens
    assert step1["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2 + 0.5 * nll, rel=1e-5)


def test_kto_round_on_graded_samples(model_path, pairs, tmp_path):
    graded = [g for p in pairs[:2] for g in as_graded(p)]
    graded.append(Graded(pairs[2].rejected, "timeout", None, "verifier timed out"))  # no verdict: left out
    res = train_round(model_path, graded, TrainConfig(algorithm="kto", **FAST), init_adapter=None,
                      out_dir=tmp_path / "kto")
    m = res.metrics
    assert m["train/examples"] == 4 and m["train/dropped_ungradeable"] == 1 and m["train/steps"] == 2
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["train/loss_first"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0): policy == reference
    assert "train/kl" in m and "train/reward_accuracy" not in m
    assert any(w.abs().max() > 0 for k, w in lora_weights(res.adapter_dir).items() if "lora_B" in k)


@pytest.mark.parametrize("reference", ["base", "previous"])
def test_continue_from_previous_adapter(first_round, model_path, pairs, tmp_path, reference):
    prev = first_round.adapter_dir
    before = lora_weights(prev)
    res = train_round(model_path, pairs[:2], TrainConfig(**FAST, reference=reference), init_adapter=prev,
                      out_dir=tmp_path / "round2")
    step1 = res.history[0]
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base_logps = sum(masked_logp(base, p.chosen, p.chosen.completion_mask) for p in pairs[:2]) / 2
    policy_logps = step1["logps/chosen"]
    ref_logps = policy_logps - step1["rewards/chosen"] / 0.1  # TRL: reward = beta * (policy - reference)
    # Either way the policy starts from the previous adapter, not from the base model.
    assert abs(policy_logps - base_logps) > 1e-2
    if reference == "base":
        assert ref_logps == pytest.approx(base_logps, abs=1e-3)
    else:  # the reference is the previous adapter, frozen: equal to the policy at step 1
        assert ref_logps == pytest.approx(policy_logps, abs=1e-5)
        assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    after = lora_weights(res.adapter_dir)
    assert after.keys() == before.keys()  # only the policy adapter is saved, never the frozen "ref" copy
    assert not all(torch.equal(after[k], before[k]) for k in after)
    prev_now = lora_weights(prev)
    assert all(torch.equal(v, prev_now[k]) for k, v in before.items())  # the previous adapter is untouched


def test_fresh_adapter_against_the_previous_reference(first_round, model_path, pairs, tmp_path):
    # reference: previous with continue_adapter: false: the new adapter starts fresh (the policy is the base model
    # at step 1) while the reference is the previous round's policy, frozen.
    prev = first_round.adapter_dir
    res = train_round(model_path, pairs[:2], TrainConfig(**FAST, reference="previous", continue_adapter=False),
                      init_adapter=prev, out_dir=tmp_path / "fresh")
    step1 = res.history[0]
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base_logps = sum(masked_logp(base, p.chosen, p.chosen.completion_mask) for p in pairs[:2]) / 2
    prev_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), prev)
    prev_logps = sum(masked_logp(prev_model, p.chosen, p.chosen.completion_mask) for p in pairs[:2]) / 2
    assert abs(prev_logps - base_logps) > 1e-2
    assert step1["logps/chosen"] == pytest.approx(base_logps, abs=1e-3)  # a fresh start
    assert step1["logps/chosen"] - step1["rewards/chosen"] / 0.1 == pytest.approx(prev_logps, abs=1e-3)
    record = json.loads((res.adapter_dir / "ratchet_train.json").read_text())
    assert record["start_adapter"] is None and record["reference_adapter"] == str(prev)


def test_divergence_raises_and_writes_no_adapter(first_round, model_path, pairs, tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged, match="previous adapter stays current"):
        train_round(model_path, pairs, TrainConfig(**{**FAST, "lr": 1e30}), init_adapter=first_round.adapter_dir,
                    out_dir=out)
    assert list(tmp_path.iterdir()) == []  # neither the adapter nor a partial one


def test_bad_input_fails_before_loading_the_model(model_path, pairs, tmp_path, first_round):
    with pytest.raises(ValueError, match="nothing to train on"):
        train_round(model_path, [], TrainConfig(), out_dir=tmp_path / "x")
    with pytest.raises(TypeError, match="PreferencePair"):
        train_round(model_path, as_graded(pairs[0]), TrainConfig(), out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="raise train.max_length"):
        train_round(model_path, pairs, TrainConfig(max_length=8), out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="r=16"):
        train_round(model_path, pairs, TrainConfig(lora_r=8), init_adapter=first_round.adapter_dir,
                    out_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a saved peft adapter"):
        train_round(model_path, pairs, TrainConfig(), init_adapter=tmp_path, out_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="config.json"):
        train_round(tmp_path, pairs, TrainConfig(), out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="per_device_batch_size >= 2"):
        TrainConfig(algorithm="kto", per_device_batch_size=1)
    with pytest.raises(ValueError, match="DPO options"):
        TrainConfig(algorithm="kto", loss="ipo")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(learning_rate=1e-4)
    assert not (tmp_path / "x").exists()


def test_divergence_reaches_trls_loss(model_path, pairs, tmp_path):
    # At step 1 (fresh adapter: policy == reference, log-ratio 0) the sigmoid loss is log 2 whatever the divergence,
    # but its gradient is scaled by f's derivative at 0 in the log-ratio: 1 for reverse KL, forward KL and alpha,
    # 1/2 for JS (d/dx [log 2 + logsigmoid(x)] = sigmoid(-x)). So JS's first gradient norm is half reverse KL's.
    norms = {}
    for divergence in ("reverse_kl", "js_divergence", "forward_kl"):
        res, _ = one_step(model_path, pairs[:2], tmp_path, divergence, divergence=divergence)
        step1 = res.history[0]
        assert step1["loss"] == pytest.approx(math.log(2), rel=1e-5)
        assert json.loads((res.adapter_dir / "ratchet_train.json").read_text())["config"]["divergence"] == divergence
        norms[divergence] = step1["grad_norm"]
    assert norms["js_divergence"] == pytest.approx(norms["reverse_kl"] / 2, rel=1e-3)
    assert norms["forward_kl"] == pytest.approx(norms["reverse_kl"], rel=1e-3)


def test_divergence_options_are_checked_at_config_load():
    with pytest.raises(ValueError, match="divergence and precompute_ref_log_probs are DPO options"):
        TrainConfig(algorithm="kto", divergence="js_divergence")
    with pytest.raises(ValueError, match="precompute_ref_log_probs are DPO options"):
        TrainConfig(algorithm="kto", per_device_batch_size=2, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="alpha_divergence_coef applies to divergence: alpha_divergence only"):
        TrainConfig(alpha_divergence_coef=0.3)
    with pytest.raises(ValueError, match="divergence"):
        TrainConfig(divergence="kl")
    assert TrainConfig(divergence="alpha_divergence", alpha_divergence_coef=0.3).alpha_divergence_coef == 0.3


def test_rehearsal_adds_the_base_models_nll_of_its_samples_to_the_loss(model_path, tok, pairs, tmp_path):
    # One step, two pairs, one rehearsal sample (a tool trajectory: its observation must stay out of the NLL). At step
    # 1 the fresh adapter leaves the policy equal to the base model, so the logged rehearsal NLL is the base model's
    # mean NLL over the sample's model tokens, and the loss is DPO's plus coef times it.
    rehearse = traj(tok, "8+1", 3, [("model", " ```python\nprint(8+1)\n```"), ("observation", "\n```output\n9\n```\n"),
                                    ("model", " It is 9.")])
    plain, _ = one_step(model_path, pairs[:2], tmp_path, "plain")
    res = train_round(model_path, pairs[:2], TrainConfig(**{**FAST, "per_device_batch_size": 2}, rehearsal_coef=0.5),
                      init_adapter=None, out_dir=tmp_path / "rehearsal", rehearsal=[rehearse])
    step1 = res.history[0]
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    mask = rehearse.completion_mask
    nll = -masked_logp(base, rehearse, mask) / sum(mask)
    assert 0 < sum(mask) < len(mask)
    assert step1["rehearsal_nll"] == pytest.approx(nll, rel=1e-4)
    assert step1["rehearsal_nll"] != pytest.approx(-masked_logp(base, rehearse, [1] * len(mask)) / len(mask), rel=1e-2)
    assert step1["loss"] == pytest.approx(plain.history[0]["loss"] + 0.5 * nll, rel=1e-4)
    assert step1["logps/chosen"] == pytest.approx(plain.history[0]["logps/chosen"], rel=1e-5)  # DPO's part unchanged
    assert res.metrics["train/rehearsal_samples"] == 1 and res.metrics["train/rehearsal_nll"] == pytest.approx(nll, rel=1e-4)
    with pytest.raises(ValueError, match="at most one per pair"):
        train_round(model_path, pairs[:1], TrainConfig(**FAST), out_dir=tmp_path / "x", rehearsal=[rehearse] * 2)
    assert not (tmp_path / "x").exists()


class FirstStepGradients(TrainerCallback):
    """The LoRA gradients of the first optimizer step (before clipping is applied to the weights)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("reference", ["base", "previous"])
def test_cpu_lm_head_and_precomputed_reference_keep_the_loss_and_gradients(first_round, model_path, pairs, tmp_path,
                                                                            monkeypatch, reference):
    """TRL's own path (its GPU-sized LM head tiles over every position, a reference forward per step) against this
    project's CPU path (small tiles over the labelled positions only, the reference precomputed once, after the "ref"
    adapter is loaded): the same first-step loss, log-probs, rewards and LoRA gradients, observations masked in both.
    Tiles smaller than the batch's 8 sequences x ~40 tokens and than the vocabulary, so several tiles are folded."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    from loop.training import trainers

    trl_globals = kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_utils._use_triton
    runs = {}
    for name, lm_head, precompute in (("trl", None, False), ("ours", {"token_tile": 100, "vocab_tile": 5000}, True)):
        monkeypatch.setattr(trainers, "CPU_LM_HEAD", lm_head)
        grads = FirstStepGradients()
        # The previous adapter as start point: its B weights are non-zero, so every LoRA weight has a gradient.
        res = train_round(model_path, pairs, TrainConfig(**{**FAST, "per_device_batch_size": 4}, reference=reference,
                                                         precompute_ref_log_probs=precompute),
                          init_adapter=first_round.adapter_dir, out_dir=tmp_path / name, callbacks=[grads])
        runs[name] = res.history[0], grads.grads
        assert (kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_utils._use_triton) == trl_globals
    assert "train/ref_precompute_s" in res.metrics
    (trl_log, trl_grads), (our_log, our_grads) = runs["trl"], runs["ours"]
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
        assert our_log[key] == pytest.approx(trl_log[key], rel=1e-4, abs=1e-5), key
    if reference == "previous":  # the policy starts as its reference: a wrong reference would show here
        assert our_log["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    else:
        assert abs(our_log["rewards/chosen"]) > 1e-3
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 0
    for n in trl_grads:
        assert trl_grads[n].abs().max() > 0, n
        torch.testing.assert_close(our_grads[n], trl_grads[n], rtol=1e-3, atol=1e-3 * trl_grads[n].abs().max().item())


# RFT (train.algorithm: sft): one correct sample per prompt, the mean NLL of its model-written tokens.

def rft_graded(task: str, sample: int, status: str = "correct", model_tokens: int = 3, finish: str = "stop") -> Graded:
    # Token ids distinct per sample, so no two samples are duplicates (which pairing would merge).
    t = Trajectory(task, sample, [1, 2], [Segment("model", "", [100 * sample + i for i in range(model_tokens)])], finish)
    return Graded(t, status, None, "")


def picks(samples: list[Graded]) -> list[tuple[str, int]]:
    return [(g.trajectory.task_id, g.trajectory.sample) for g in samples]


@pytest.mark.parametrize("keep_truncated", [False, True])
def test_sft_rft_samples_pick_one_finished_correct_sample_per_prompt(keep_truncated):
    graded = [rft_graded("a", 0, model_tokens=5), rft_graded("a", 1, model_tokens=3),
              rft_graded("a", 2, model_tokens=1, finish="length"),  # the shortest correct one, but cut off
              rft_graded("a", 3, "incorrect", model_tokens=1),
              rft_graded("b", 0, "incorrect"), rft_graded("b", 1, "no_answer"),  # nothing correct
              rft_graded("c", 0, finish="max_turns"), rft_graded("c", 1, "timeout"),  # correct only when cut off
              rft_graded("d", 1, model_tokens=2), rft_graded("d", 0, model_tokens=2),  # a tie: the earlier sample
              rft_graded("e", 0, finish="context"), rft_graded("e", 1, model_tokens=9)]
    cfg = PairsConfig(keep_truncated=keep_truncated)
    assert picks(rft_samples(graded, cfg)) == [("a", 1), ("d", 0), ("e", 1)]
    assert picks(rft_samples(graded, cfg, "shortest")) == picks(rft_samples(list(reversed(graded)), cfg))[::-1]

    # random: seeded by (seed, task); over seeds it reaches every finished correct sample and nothing else.
    seen = {}
    for seed in range(30):
        got = rft_samples(graded, PairsConfig(keep_truncated=keep_truncated, seed=seed), "random")
        assert got == rft_samples(graded, PairsConfig(keep_truncated=keep_truncated, seed=seed), "random")
        assert [t for t, _ in picks(got)] == ["a", "d", "e"]
        for task, sample in picks(got):
            seen.setdefault(task, set()).add(sample)
    assert seen == {"a": {0, 1}, "d": {0, 1}, "e": {1}}


def test_sft_rft_samples_follow_the_pairing_drops():
    # Identical completions graded differently have no trustworthy verdict: both go, as in pairing. A verifier timeout
    # counted as incorrect is never a target.
    conflict = [rft_graded("a", 0), rft_graded("a", 1, "incorrect")]
    conflict[1].trajectory.segments = conflict[0].trajectory.segments
    assert rft_samples(conflict + [rft_graded("b", 0, "timeout")], PairsConfig(timeout_as_incorrect=True)) == []
    with pytest.raises(ValueError, match="use shortest or random"):
        rft_samples(conflict, PairsConfig(), "longest")


def tool_sample(tok, task: str, answer: str, sample: int = 0) -> Graded:
    """A correct tool trajectory: code, an observation in the middle (context, not trained on), the answer."""
    return Graded(traj(tok, task, sample, [("model", f" ```python\nprint({task})\n```"),
                                           ("observation", f"\n```output\n{answer}\n```\n"),
                                           ("model", f" It is {answer}.")]), "correct", None, "")


@pytest.fixture(scope="module")
def sft_samples(tok) -> list[Graded]:
    return [tool_sample(tok, "2+3", "5"), tool_sample(tok, "4*5", "20"), tool_sample(tok, "7-1", "6"),
            tool_sample(tok, "9/3", "3.0")]


@pytest.fixture(scope="module")
def sft_round(model_path, sft_samples, tmp_path_factory):
    # One batch of all four samples, two epochs: step 1 sees every sample with the policy still equal to the base.
    return train_round(model_path, sft_samples, TrainConfig(algorithm="sft", **{**FAST, "per_device_batch_size": 4,
                                                                                  "epochs": 2}),
                       init_adapter=None, out_dir=tmp_path_factory.mktemp("sft") / "adapter")


def mean_nll(model, samples: list[Graded], masked: bool = True) -> float:
    """The token-weighted mean NLL over the samples' completion tokens: the model-written ones only (masked), or
    every completion token, observations included."""
    trajs = [g.trajectory for g in samples]
    masks = [t.completion_mask if masked else [1] * len(t.completion_mask) for t in trajs]
    return -sum(masked_logp(model, t, m) for t, m in zip(trajs, masks)) / sum(sum(m) for m in masks)


def test_sft_loss_is_the_mean_nll_of_model_tokens_with_observations_masked(sft_round, sft_samples, model_path):
    # At step 1 the fresh adapter leaves the policy equal to the base model, so TRL's loss must equal a plain forward
    # of the base model: log-softmax, the NLL of each model-written token, averaged over all of the batch's.
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    step1 = sft_round.history[0]
    assert step1["loss"] == pytest.approx(mean_nll(base, sft_samples), rel=1e-4)
    # It can tell masked from unmasked (a gap a hundred times the tolerance above).
    assert mean_nll(base, sft_samples, masked=False) != pytest.approx(step1["loss"], rel=1e-2)
    m = sft_round.metrics
    assert m["train/loss_first"] == step1["loss"] and m["train/loss_last"] < m["train/loss_first"]
    assert m["train/steps"] == 2 and m["train/examples"] == 4
    assert m["train/model_tokens"] == sum(g.trajectory.num_model_tokens for g in sft_samples)
    assert m["train/observation_tokens"] == sum(len(g.trajectory.completion_mask) for g in sft_samples) - \
        m["train/model_tokens"] > 0
    assert 0 <= m["train/token_accuracy"] <= 1 and "train/reward_accuracy" not in m and "train/kl" not in m
    assert all(math.isfinite(v) for v in m.values()), m


def test_sft_round_writes_a_loadable_adapter_with_its_probe(sft_round, sft_samples, model_path):
    res = sft_round
    assert sorted(p.name for p in res.adapter_dir.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "ratchet_probe.json", "ratchet_train.json"]
    assert not any(p.name.startswith(".") for p in res.adapter_dir.parent.iterdir())
    assert any(w.abs().max() > 0 for k, w in lora_weights(res.adapter_dir).items() if "lora_B" in k)
    record = json.loads((res.adapter_dir / "ratchet_train.json").read_text())
    assert record["config"]["algorithm"] == "sft" and record["reference_adapter"] is None
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                       res.adapter_dir)
    probe = json.loads((res.adapter_dir / "ratchet_probe.json").read_text())
    t = sft_samples[0].trajectory
    assert probe["token_ids"] == (t.prompt_token_ids + t.completion_token_ids)[-128:]
    base_lp, tuned_lp = probe_logprobs(loaded, probe["token_ids"])
    assert probe["adapter_logprobs"] == pytest.approx(tuned_lp, abs=1e-4)
    assert probe["base_logprobs"] == pytest.approx(base_lp, abs=1e-4)
    assert probe["adapter_logprobs"] != pytest.approx(probe["base_logprobs"], abs=1e-3)
    # Trained towards the samples: the adapter's NLL of them is below the base model's.
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    assert mean_nll(loaded, sft_samples) < mean_nll(base, sft_samples) - 0.1


def test_sft_continues_the_previous_adapter(sft_round, sft_samples, model_path, tmp_path):
    prev = sft_round.adapter_dir
    before = lora_weights(prev)
    res = train_round(model_path, sft_samples[:2], TrainConfig(algorithm="sft", **FAST), init_adapter=prev,
                      out_dir=tmp_path / "round2")
    prev_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), prev)
    # Step 1 starts from the previous adapter, not from the base model.
    assert res.history[0]["loss"] == pytest.approx(mean_nll(prev_model, sft_samples[:2]), rel=1e-4)
    assert json.loads((res.adapter_dir / "ratchet_train.json").read_text())["start_adapter"] == str(prev)
    after = lora_weights(res.adapter_dir)
    assert after.keys() == before.keys() and not all(torch.equal(after[k], before[k]) for k in after)
    assert all(torch.equal(v, lora_weights(prev)[k]) for k, v in before.items())  # the previous adapter is untouched


def test_sft_divergence_raises_and_writes_no_adapter(sft_round, sft_samples, model_path, tmp_path):
    with pytest.raises(TrainingDiverged, match="previous adapter stays current"):
        train_round(model_path, sft_samples, TrainConfig(algorithm="sft", **{**FAST, "lr": 1e30}),
                    init_adapter=sft_round.adapter_dir, out_dir=tmp_path / "diverged")
    assert list(tmp_path.iterdir()) == []


def test_sft_bad_input_and_options_are_refused(model_path, pairs, sft_samples, tmp_path):
    wrong = Graded(pairs[0].rejected, "incorrect", None, "")
    with pytest.raises(ValueError, match="sft imitates correct samples only.*graded incorrect.*rft_samples"):
        train_round(model_path, [sft_samples[0], wrong], TrainConfig(algorithm="sft"), out_dir=tmp_path / "x")
    with pytest.raises(TypeError, match="rft_samples"):
        train_round(model_path, pairs, TrainConfig(algorithm="sft"), out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="with algorithm: sft set pairs.rehearsal: 0"):
        train_round(model_path, sft_samples, TrainConfig(algorithm="sft"), out_dir=tmp_path / "x",
                    rehearsal=[sft_samples[0].trajectory])
    assert not (tmp_path / "x").exists()
    for option in ({"nll_coef": 0.5}, {"loss": "ipo"}, {"divergence": "forward_kl"}, {"precompute_ref_log_probs": True}):
        with pytest.raises(ValueError, match="DPO options; with algorithm: sft leave them at their defaults"):
            TrainConfig(algorithm="sft", **option)
    with pytest.raises(ValueError, match="sft trains without a reference model"):
        TrainConfig(algorithm="sft", reference="previous")
    with pytest.raises(ValueError, match="sft_pick chooses the samples of algorithm: sft"):
        TrainConfig(sft_pick="random")
    with pytest.raises(ValueError, match="sft_pick"):
        TrainConfig(algorithm="sft", sft_pick="longest")
    assert TrainConfig(algorithm="sft", sft_pick="random").sft_pick == "random"


def test_sft_through_the_flows_train_task(model_path, tok, tmp_path):
    # The flow's train stage reads the round's graded samples and trains on rft_samples' pick: here one prompt with
    # two correct samples (the shorter is trained on), one all wrong, one correct only when cut off.
    from prefect.logging import disable_run_logger

    from flows.self_improve import train as train_stage
    from loop.config import RunConfig
    from loop.run.directory import write_jsonl

    short, long = tool_sample(tok, "2+3", "5", sample=1), tool_sample(tok, "2+3", "5.0 (two plus three)", sample=0)
    cut = tool_sample(tok, "4*5", "20")
    cut.trajectory.finish_reason = "length"
    wrong = Graded(traj(tok, "7-1", 0, [("model", " It is 8.")]), "incorrect", None, "")
    write_jsonl(tmp_path / "graded.jsonl", (g.to_dict() for g in (long, short, cut, wrong)))
    cfg = RunConfig(name="t", model="smollm2-135m-instruct", train_tasks={"family": "arithmetic", "split": "train"},
                    eval={"tasks": {"family": "arithmetic", "split": "eval"}}, pairs={"keep_truncated": True},
                    train={"algorithm": "sft", "sft_pick": "shortest", **FAST})
    with disable_run_logger():
        m = train_stage.fn(model_path, cfg, tmp_path / "pairs.jsonl", tmp_path / "graded.jsonl", None,
                           tmp_path / "adapter")
        assert m["train/skipped"] == 0 and m["train/examples"] == 1
        assert m["train/model_tokens"] == short.trajectory.num_model_tokens < long.trajectory.num_model_tokens
        assert (tmp_path / "adapter" / "ratchet_probe.json").is_file()
        write_jsonl(tmp_path / "graded.jsonl", (g.to_dict() for g in (cut, wrong)))
        assert train_stage.fn(model_path, cfg, tmp_path / "pairs.jsonl", tmp_path / "graded.jsonl", None,
                              tmp_path / "adapter2") == {"train/skipped": 1.0}
    assert not (tmp_path / "adapter2").exists()
