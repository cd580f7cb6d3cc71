"""No knob without effect (issue 22): every setting a run accepts changes what it keeps, or is refused with one
ConfigError line before any weights load; an official count rule that cannot stand for `keep` is flagged in
the records and said once per run."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from helpers import VIDEO_METHODS, noise_image

from clse_exp import load_model, make_pruner
from clse_exp.api import compose_config
from clse_exp.config import validate_run
from clse_exp.data.sample import Sample
from clse_exp.errors import ConfigError
from clse_exp.generation import prepare
from clse_exp.pruning.engine import Pruner
from clse_exp.pruning.methods import METHODS
from clse_exp.pruning.methods.base import Layers, ModelFacts

PROTOCOLS = ("official", "uniform")
CLIP_METHODS = ("visionzip", "prumerge_plus", "cdpruner", "vispruner")  # they read LLaVA-1.5's CLIP encoder
QUESTION = "What colour is the shape in the top left cell? Answer with one word."
Context = tuple[str, ...]
# Per method option (besides kv_policy and shape, whose telling value depends on the resolved default): the
# settings that differ from what the default resolves to on the test model, each with the overrides it needs
# on both sides of the comparison (its context). Each must change the kept tokens or be refused.
CANDIDATES: dict[tuple[str, str], list[tuple[Context, Context]]] = {
    ("clse", "score_type"): [((), ("prune.score_type=clse",)), ((), ("prune.score_type=attn",))],
    ("clse", "cutoff_ratio"): [((), ("prune.cutoff_ratio=0.4",)),
                               (("prune.score_type=attn",), ("prune.cutoff_ratio=0.4",))],
    ("clse", "temperature"): [((), ("prune.temperature=2.0",)),
                              (("prune.score_type=attn",), ("prune.temperature=2.0",)),
                              (("prune.score_type=clse",), ("prune.temperature=2.0",))],
    ("clse", "spectral"): [((), ("prune.spectral=3d",))],
    # at the default cutoff every high-pass filter removes about the DC term of a 6 x 6 grid alone: alike there
    ("clse", "filter"): [(("prune.cutoff_ratio=0.5",), (f"prune.filter={name}",)) for name in
                         ("ideal_highpass", "butterworth_highpass", "gaussian_lowpass")]
                        + [((), ("prune.filter=bandpass",)), ((), ("prune.filter=bandpass", "prune.band=[0.2,0.6]"))],
    ("clse", "band"): [((), ("prune.band=[0.2,0.6]",)),
                       (("prune.filter=bandpass", "prune.band=[0.2,0.6]"), ("prune.cutoff_ratio=0.4",))],
    ("clse", "order"): [((), ("prune.order=4",)), ((), ("prune.filter=butterworth_highpass", "prune.order=0"))],
    # at the published depth `scaled` gives the official layers; at 24 layers `auto` keeps them, `scaled` moves them
    ("clse", "transfer"): [(("model=tiny_qwen2vl", "model.tiny.num_layers=24"), ("prune.transfer=scaled",)),
                           (("model=tiny_qwen2vl",), ("prune.transfer=scaled", "layers.prune_layers=[2,5,9]"))],
    ("clse", "shape"): [(("model=tiny_qwen2vl",), ("prune.shape=[1,1,1]",))],  # three stages: the official tables
    ("dart", "visual_pivots"): [((), ("prune.visual_pivots=2",)), ((), ("prune.visual_pivots=80",))],
    ("dart", "text_pivots"): [((), ("prune.text_pivots=0",))],
    ("sparsevlm", "recycle"): [((), ("prune.recycle=false",))],
    ("sparsevlm", "count_rule"): [((), ("prune.count_rule=rank",))],
    ("visionzip", "contextual_share"): [((), ("prune.contextual_share=0.5",))],
    ("prumerge_plus", "adaptive"): [((), ("prune.adaptive=true",))],
    ("cdpruner", "clip"): [((), ("prune.clip=/nonexistent/clip",))],  # `tiny` is what `auto` picks here
    ("vispruner", "important_ratio"): [((), ("prune.important_ratio=0.75",)), ((), ("prune.important_ratio=1.5",))],
    ("fastvid", "dyseg_c"): [(("prune.dyseg_tau=-1",), ("prune.dyseg_c=2",))],
    ("fastvid", "dyseg_tau"): [(("prune.dyseg_c=2",), ("prune.dyseg_tau=-1",))],
    ("fastvid", "stprune_d"): [((), ("prune.stprune_d=0.0",))],
    ("fastvid", "dtm_p"): [(("prune.dyseg_tau=-1", "prune.dyseg_c=2"), ("prune.dtm_p=1",))],
    ("fastvid", "dyseg_ignore"): [((), ("prune.dyseg_ignore=0.5",))],
    ("fastvid", "dtm_beta"): [((), ("prune.dtm_beta=0.1",))],
    ("holitom", "tau"): [((), ("prune.tau=0.5",))],
    ("holitom", "beta"): [(("prune.tau=0.5",), ("prune.beta=0.1",))],
    ("holitom", "d"): [((), ("prune.d=0.5",))],
    ("holitom", "k"): [(("prune.d=1",), ("prune.k=1",))],
    ("holitom", "max_window_size"): [(("prune.tau=-1",), ("prune.max_window_size=2",))],
    ("holitom", "llm_ratio"): [((), ("prune.llm_ratio=0.2",))],
    ("vidcom2", "channel_ratio"): [((), ("prune.channel_ratio=1.0",))],
    ("vidcom2", "temperature"): [((), ("prune.temperature=1.0",))],
    ("dycoke", "merge_ratio"): [((), ("prune.merge_ratio=0.3",))],
    ("dycoke", "tokens_per_frame"): [((), ("prune.tokens_per_frame=4",))],
    ("dycoke", "decode_pruning"): [((), ("prune.decode_pruning=false",))],
    ("dycoke", "decode_layer"): [((), ("prune.decode_layer=5",))],
    ("dycoke", "decode_ratio"): [((), ("prune.decode_ratio=0.5",))],
    ("dycoke", "similarity_threshold"): [((), ("prune.similarity_threshold=2.0",))],
}
ENGINE_OPTIONS = ("name", "kv_policy", "shape")  # every method's; kv_policy and shape are tried below


# Options that act after the cut, never on which tokens are kept (merge weights, decode-step pruning): for
# these the test compares what a short greedy generation scores instead of the kept tokens
OUTPUT_ONLY = {("fastvid", "dtm_beta"), ("holitom", "beta"), ("dycoke", "decode_pruning"), ("dycoke", "decode_layer"),
               ("dycoke", "decode_ratio"), ("dycoke", "similarity_threshold")}


def _model(method: str) -> list[str]:
    """The tiny model (and input) each method runs on here. CLSE runs on the trained toy: on random weights its
    evolution's sigmoid saturates and outweighs the attention factor, so its spectral knobs rarely move a large
    first cut."""
    if method == "clse":
        return ["model=toy_qwen2vl"]
    if method in VIDEO_METHODS:
        return ["model=tiny_llava_onevision", "dataset.variant=video"]
    return ["model=tiny_llava" if method in CLIP_METHODS else "model=tiny_qwen2vl"]


def _sample(cfg) -> Sample:
    if cfg.dataset.get("variant") == "video":
        return Sample("s", QUESTION, "", [], video=[noise_image(50 + i, 112) for i in range(4)])
    return Sample("s", QUESTION, "", [noise_image(7, 224)])


@pytest.fixture(scope="module")
def loaded_models():
    """Tiny models by their config's identity (name and depth), loaded once for the module."""
    cache: dict = {}

    def get(cfg):
        key = (cfg.model.name, cfg.model.tiny.num_layers)
        if key not in cache:
            cache[key] = load_model(cfg.model, "cpu")
        return cache[key]

    return get


def _kept(loaded_models, overrides: list[str], outputs: bool = False) -> tuple | None:
    """What a run of `overrides` keeps (per stage its layer and kept indices; per sample each layer's cache),
    or None when it is refused with a ConfigError, before weights load or at its first forward. With
    `outputs`, the scores of three greedy tokens instead (rounded: equal runs give equal floats)."""
    try:
        cfg = compose_config(overrides)
        pruner = validate_run(cfg)
        loaded = loaded_models(cfg)
        inputs = prepare(loaded, [_sample(cfg)], pruner)
        with torch.no_grad(), pruner.attach(loaded.model):
            if outputs:
                out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                            return_dict_in_generate=True)
                return tuple(np.round(torch.stack(out.scores).float().numpy(), 5).ravel().tolist())
            loaded.model(**inputs, use_cache=True)
    except ConfigError:
        return None
    trace = tuple((stage["layer"], tuple(map(tuple, stage["kept"]))) for stage in pruner.trace)
    return trace, tuple(tuple(record.cached) for record in pruner.records)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_option_changes_the_kept_tokens_or_is_refused(method, loaded_models):
    """Each non-default setting of each option of `method`, under both protocols, keeps other tokens (or
    caches other tokens) than the default does, or is refused: none is silently ignored."""
    fields = [f.name for f in dataclasses.fields(METHODS[method].Options)]
    tried = {f for m, f in CANDIDATES if m == method}
    assert set(fields) - set(ENGINE_OPTIONS) == tried - set(ENGINE_OPTIONS), \
        f"an option of prune={method} has no candidate setting in this test"
    for protocol in PROTOCOLS:
        base = [*_model(method), f"prune={method}", "keep=0.4", f"protocol={protocol}"]
        default = _kept(loaded_models, base)
        assert default is not None, f"prune={method} protocol={protocol} runs with its defaults"
        pruner = validate_run(compose_config(base))
        opposite = "ragged" if pruner.rules.kv_policy == "crop" else "crop"
        tries = [((), (f"prune.kv_policy={opposite}",)),
                 ((), (f"prune.shape=[{','.join(['1.0'] * len(pruner.layers.prune_layers))}]",))]
        tries = [(False, *item) for item in tries]
        tries += [((m, option) in OUTPUT_ONLY, *item) for (m, option), items in CANDIDATES.items() if m == method
                  for item in items]
        for outputs, context, change in tries:
            reference = _kept(loaded_models, [*base, *context], outputs) if context or outputs else default
            if reference is None:  # a context this protocol refuses has nothing to compare with
                continue
            got = _kept(loaded_models, [*base, *context, *change], outputs)
            assert got is None or got != reference, (f"prune={method} protocol={protocol} {' '.join(context)}: "
                                                     f"{' '.join(change)} was accepted and kept the same tokens")


# ------------------------------------------------------------------------------------- the findings, one each
def _run(loaded, pruner, images):
    inputs = prepare(loaded, [Sample(f"s{i}", QUESTION, "", [image]) for i, image in enumerate(images)], pruner)
    with torch.no_grad(), pruner.attach(loaded.model):
        loaded.model(**inputs)
    return pruner.records


@pytest.fixture(scope="module")
def toy():
    return load_model("toy_qwen2vl", "cpu")


@pytest.fixture(scope="module")
def tiny_qwen():
    return load_model("tiny_qwen2vl", "cpu")


def test_dart_official_counts_that_cancel_or_miss_the_budget_are_flagged_and_said_once(toy, tiny_qwen, caplog):
    with caplog.at_level(logging.WARNING, logger="clse_exp"):
        overshoot = _run(toy, make_pruner("dart", keep=0.1, budget="final", visual_pivots=40),
                         [noise_image(1), noise_image(2)])
    assert [r.retention["final"] for r in overshoot] == [1.0, 1.0]
    assert all(r.budget_unreachable for r in overshoot)
    assert caplog.text.count("prune=dart keep=0.1") == 1 and "exceeds" in caplog.text
    short = _run(tiny_qwen, make_pruner("dart", keep=0.3, text_pivots=20), [noise_image(3)])
    assert short[0].retention["final"] == 4 / 64 and short[0].budget_unreachable
    small = _run(toy, make_pruner("dart", keep=0.1, budget="final"), [noise_image(4, 56)])  # a 2 x 2 grid
    assert small[0].n_visual == 4 and small[0].retention["final"] == 1.0 and small[0].budget_unreachable
    # 4 + 8 * (9 // 8) = 12 for 9 asked: steps of 8 tokens on a 36-token image are no longer rounding (0.333 for
    # 0.25), so the record-level check flags it; on a real 576-token image the same step is 0.014
    coarse = _run(toy, make_pruner("dart", keep=0.25, budget="final"), [noise_image(5)])
    assert coarse[0].retention["final"] == 12 / 36 and coarse[0].budget_unreachable


def test_the_one_token_floor_is_flagged_under_either_budget(tiny_llava):
    flags = {budget: [r.budget_unreachable for r in _run(tiny_llava, make_pruner("downsample", keep=0.01,
                                                                                  budget=budget), [noise_image(6)])]
             for budget in ("average", "final")}
    assert flags == {"average": [True], "final": [True]}


def _refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        validate_run(compose_config(overrides))  # reads no weights
    message = str(err.value)
    assert "\n" not in message
    return message


def test_downsample_refuses_layers_on_families_it_resizes():
    message = _refused(["model=tiny_qwen2vl", "prune=downsample", "layers.prune_layers=[5]"])
    assert "layers.prune_layers=[5] has no effect" in message and "before the vision tower" in message


def test_official_dart_refuses_a_second_cut():
    """The official code cuts once; two stages used to crash in the planner (a zip of 2 layers with 1 count)."""
    message = _refused(["model=tiny_qwen2vl", "prune=dart", "protocol=official", "layers.prune_layers=[2,4]"])
    assert "layers.prune_layers=[2, 4] has 2" in message and "protocol=uniform" in message
    validate_run(compose_config(["model=tiny_qwen2vl", "prune=dart", "protocol=uniform", "layers.prune_layers=[2,4]"]))


def test_prumerge_adaptive_flags_every_sample_and_says_keep_sets_no_count(tiny_llava, caplog):
    kept = []
    for keep in (0.5, 0.1):
        with caplog.at_level(logging.WARNING, logger="clse_exp"):
            records = _run(tiny_llava, make_pruner("prumerge_plus", keep=keep, adaptive=True), [noise_image(8)])
        kept.append(records[0].kept)
        assert records[0].budget_unreachable
    assert kept[0] == kept[1]
    assert caplog.text.count("prune.adaptive=true keeps the official IQR count") == 2  # one line per run


def test_make_pruner_reads_layers_and_numbers_as_given():
    with pytest.raises(ConfigError, match=r"prune_layers='12' is not a list"):
        make_pruner("fastv", prune_layers="12")
    with pytest.raises(ConfigError, match=r"prune_layers=2 is not a list.*\[2\]"):
        make_pruner("fastv", prune_layers=2)
    with pytest.raises(ConfigError, match=r"prune_layers entry=2.5 is not a layer index"):
        make_pruner("fastv", prune_layers=[2.5])
    with pytest.raises(ConfigError, match=r"keep='0.3' is not a number"):
        make_pruner("fastv", keep="0.3")
    with pytest.raises(ConfigError, match=r"layers.prune_layers='12' is not a list"):  # the engine's own door
        Pruner(METHODS["fastv"](), keep=0.5, prune_layers="12")
    pruner = make_pruner("pdrop", keep=np.float32(0.5), prune_layers=np.array([1, 5, 9]), model="tiny_qwen2vl")
    assert pruner.layers.prune_layers == (1, 5, 9) and pruner.keep == pytest.approx(0.5)
    pruner = make_pruner("clse", keep=0.5, reference_layer=np.int64(1), prune_layers=[np.int64(2)],
                         cutoff_ratio=np.float64(0.2), model="tiny_qwen2vl")
    assert pruner.layers == Layers(1, (2,)) and pruner.method.options.cutoff_ratio == 0.2


def test_cdpruner_says_once_per_run_when_the_official_rule_keeps_fewer_than_asked(llava576, caplog):
    loaded, _, _ = llava576
    pruner = make_pruner("cdpruner", keep=0.5, budget="final")
    with caplog.at_level(logging.WARNING, logger="clse_exp"):
        records = _run(loaded, pruner, [noise_image(7, 336), noise_image(9, 336)])
    assert all(r.retention["final"] < 0.5 for r in records)  # 64 channels: the kernel's rank is at most 64
    assert all(r.budget_unreachable for r in records)  # the record says so too
    assert caplog.text.count("prune=cdpruner protocol=official: a sample kept") == 1
    assert "of the 288 tokens asked" in caplog.text and "runs out of rank" in caplog.text


@pytest.mark.parametrize("method", ["pdrop", "clse", "sparsevlm"])
def test_shape_is_refused_where_an_official_count_rule_sets_the_counts(method):
    model = "tiny_llava" if method == "sparsevlm" else "tiny_qwen2vl"
    message = _refused([f"model={model}", f"prune={method}", "keep=0.4", "prune.shape=[1,1,1]"])
    assert "prune.shape=[1.0, 1.0, 1.0] has no effect" in message and "protocol=uniform" in message
    assert validate_run(compose_config([f"model={model}", f"prune={method}", "keep=0.4", "protocol=uniform",
                                        "prune.shape=[1,1,1]"])).shape == [1.0, 1.0, 1.0]


def test_reference_layer_only_where_it_is_read():
    for method in sorted(set(METHODS) - {"clse"}):
        model = "tiny_llava" if method in CLIP_METHODS else "tiny_qwen2vl"
        message = _refused([f"model={model}", f"prune={method}", "layers.reference_layer=0"])
        assert f"layers.reference_layer=0 has no effect: prune={method} reads no reference layer" in message
    assert "score_type=attn" in _refused(["prune=clse", "prune.score_type=attn", "layers.reference_layer=0"])
    assert validate_run(compose_config(["prune=clse", "layers.reference_layer=1", "layers.prune_layers=[1]"])
                        ).layers == Layers(1, (1,))


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["prune.score_type=attn", "prune.cutoff_ratio=0.2"], ["prune.cutoff_ratio=0.2 has no effect", "attn"]),
    (["prune.score_type=attn", "prune.filter=ideal_highpass"], ["prune.filter='ideal_highpass' has no effect"]),
    (["prune.score_type=attn", "prune.temperature=0.5"], ["prune.temperature=0.5 has no effect"]),
    (["prune.score_type=clse", "prune.temperature=0.5"], ["prune.temperature=0.5 has no effect", "monotone"]),
    (["prune.band=[0.1,0.5]"], ["prune.band=[0.1, 0.5] has no effect", "bandpass"]),
    (["prune.filter=bandpass", "prune.band=[0.1,0.5]", "prune.cutoff_ratio=0.3"], ["prune.cutoff_ratio=0.3"]),
    (["prune.order=3"], ["prune.order=3 has no effect", "butterworth"]),
    (["prune.order=0"], ["prune.order=0"]),
    (["prune.filter=butterworth_highpass", "prune.order=0"], ["prune.order=0 must be >= 1"]),
    (["prune.filter=gaussian_lowpass", "prune.cutoff_ratio=0"], ["prune.cutoff_ratio=0", "gaussian_lowpass"]),
    (["prune.spectral=3d"], ["prune.spectral=3d", "no videos", "frame2d"]),
    (["model=tiny_llava", "prune.spectral=3d", "dataset.variant=video"], ["prune.spectral=3d", "'llava'"]),
    (["prune=cdpruner", "model=tiny_llava", "prune.clip=/nonexistent"], ["prune.clip='/nonexistent'",
                                                                         "not a loadable CLIP checkpoint"]),
    (["model=tiny_llava", "prune=divprune", "prune.kv_policy=crop"], ["prune.kv_policy=crop has no effect"]),
    (["model=tiny_qwen2vl", "prune=fastv", "prune.shape=[0.5]"], ["prune.shape=[0.5] has no effect", "once"]),
])
def test_knobs_nothing_reads_are_refused_before_weights_load(overrides, fragments):
    message = _refused(overrides if any(o.startswith("prune=") for o in overrides) else ["prune=clse", *overrides])
    for fragment in fragments:
        assert fragment in message


def test_a_nested_attach_is_refused(toy):
    pruner = make_pruner("fastv", keep=0.5, budget="final")
    with pruner.attach(toy.model), pytest.raises(RuntimeError, match="already attached"), pruner.attach(toy.model):
        pass
    other = make_pruner("random", keep=0.5)
    with pruner.attach(toy.model), pytest.raises(RuntimeError, match="another pruner"), other.attach(toy.model):
        pass
    records = _run(toy, pruner, [noise_image(1)])  # after both blocks: attached once, each stage once
    assert len(pruner.trace) == 1 and records[0].kept_per_stage == [18]


@pytest.mark.parametrize("depth", [24, 36])
def test_official_clse_keeps_the_official_layers_and_table_at_other_depths(depth, caplog):
    published = make_pruner("clse", keep=0.334).bind(ModelFacts("qwen2_vl", 28, True))
    with caplog.at_level(logging.WARNING, logger="clse_exp"):
        other = make_pruner("clse", keep=0.334).bind(ModelFacts("qwen2_vl", depth, True))
        paper = make_pruner("clse", keep=0.334, schedule="paper", protocol="uniform").bind(
            ModelFacts("qwen2_vl", depth, True))
        assert caplog.text == ""  # said when a run plans, not when a config is checked
        plans = [pruner.plan(n) for pruner in (other, paper, published) for n in (576, 100)]
    assert other.layers == paper.layers == published.layers == Layers(0, (1, 10, 19))
    assert plans[0] == plans[2] == plans[4] == {1: 328, 10: 207, 19: 56} and plans[1] == plans[3] == plans[5]
    assert caplog.text.count(f"hard-codes them on this {depth}-layer model") == 2  # once per run (pruner)
    scaled = make_pruner("clse", keep=0.334, transfer="scaled").bind(ModelFacts("qwen2_vl", depth, True))
    expected = tuple(sorted({max(1, round(f * depth / 28)) for f in (1, 10, 19)}))
    assert scaled.layers == Layers(0, expected) and scaled.plan(576) != published.plan(576)
    qwen3 = make_pruner("clse", keep=0.334).bind(ModelFacts("qwen3_vl", depth, True))  # no official code
    assert qwen3.layers == Layers(0, expected)
    with pytest.raises(ConfigError, match="prune.transfer=official: model family 'qwen3_vl' has no official"):
        make_pruner("clse", keep=0.334, transfer="official").bind(ModelFacts("qwen3_vl", depth, True))
    with pytest.raises(ConfigError, match=r"official layers \[1, 10, 19\] do not exist in a 4-layer model"):
        make_pruner("clse", keep=0.5, transfer="official").bind(ModelFacts("qwen2_vl", 4, True))
