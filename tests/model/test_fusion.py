"""Fusion strategies x sequence stages: shapes, gradients, padding invariance, ONNX parity, end to end.

Unit tests use random features at tiny widths; the end-to-end tests train each strategy for one
epoch on the session's tiny demo dataset, export a bundle and classify through the server.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model.config import TrainConfig
from model.encoders.bilstm import BiLSTMText
from model.encoders.small_cnn import SmallCNN
from model.fusion import FUSIONS, SEQUENCE_STAGES, Fusion, build_sequence_stage
from model.fusion.concat import build_concat
from model.fusion.late import LateFusion
from model.fusion_model import FusionHeadGraph, FusionModel
from tests.helpers.images import demo_png

DI, DT, H, C, R = 12, 10, 16, 5, 9
"""Image width, text width, hidden width, classes, image regions: small but all different."""
COMBOS = [(name, stage) for name in FUSIONS.names() for stage in SEQUENCE_STAGES.names()]
COMBO_IDS = [f"{name}-{stage}" for name, stage in COMBOS]
INPUT_NAMES = ["image_features", "image_regions", "text_features", "text_tokens", "attention_mask"]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These tensors are tiny: a second thread only adds OpenMP synchronisation (and spin-waiting on busy CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_fusion(name: str, stage: str, seed: int = 0) -> Fusion:
    torch.manual_seed(seed)
    return FUSIONS.get(name)(DI, DT, H, 0.1, num_classes=C, num_regions=R, sequence_stage=stage)


def features(lengths: list[int], seq: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random (image_pooled, image_regions, text_pooled, text_tokens, mask); padding holds garbage, not zeros."""
    g = torch.Generator().manual_seed(seed)
    batch, seq = len(lengths), seq or max(lengths)
    mask = (torch.arange(seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    return (
        torch.randn(batch, DI, generator=g),
        torch.randn(batch, R, DI, generator=g),
        torch.randn(batch, DT, generator=g),
        torch.randn(batch, seq, DT, generator=g) * 3,
        mask,
    )


@pytest.mark.parametrize(("name", "stage"), COMBOS, ids=COMBO_IDS)
def test_output_is_one_finite_vector_of_out_dim_per_sample(name: str, stage: str) -> None:
    fusion = make_fusion(name, stage).eval()
    out = fusion(*features([5, 2, 7]))
    assert fusion.out_dim == (C if name == "late" else H)
    assert fusion.produces_logits == (name == "late")
    assert fusion.sequence_stage == stage
    assert out.shape == (3, fusion.out_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "stage"), COMBOS, ids=COMBO_IDS)
def test_gradient_reaches_both_modalities_and_never_the_padding(name: str, stage: str) -> None:
    fusion = make_fusion(name, stage).train()
    ip, ir, tp, tt, mask = (t.requires_grad_() if t.is_floating_point() else t for t in features([5, 2, 7]))
    (fusion(ip, ir, tp, tt, mask) ** 2).sum().backward()

    def norm(t: torch.Tensor) -> float:
        return 0.0 if t.grad is None else float(t.grad.abs().sum())

    assert norm(ip) + norm(ir) > 0, "no gradient reaches the image features"
    assert norm(tp) + norm(tt) > 0, "no gradient reaches the text features"
    if tt.grad is not None:
        padded = tt.grad[mask == 0]
        assert padded.abs().max() == 0, "padding positions influence the output"


@pytest.mark.parametrize(("name", "stage"), COMBOS, ids=COMBO_IDS)
def test_a_texts_output_does_not_change_when_its_batch_is_padded_longer(name: str, stage: str) -> None:
    fusion = make_fusion(name, stage).eval()
    ip, ir, tp, tt, mask = features([4], seq=4, seed=1)
    other = features([9], seed=2)
    padded_tokens = torch.cat([torch.cat([tt, torch.randn(1, 5, DT) * 3], 1), other[3]])  # garbage in the padding
    padded_mask = torch.cat([torch.cat([mask, torch.zeros(1, 5, dtype=torch.long)], 1), other[4]])
    with torch.no_grad():
        alone = fusion(ip, ir, tp, tt, mask)
        batched = fusion(
            torch.cat([ip, other[0]]), torch.cat([ir, other[1]]), torch.cat([tp, other[2]]), padded_tokens, padded_mask
        )
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def _tiny_model(fusion: Fusion, aux_heads: bool = False) -> FusionModel:
    return FusionModel(SmallCNN(width=4, out_dim=DI), BiLSTMText(30, embed_dim=8, hidden=DT // 2), fusion, C,
                       embed_dim=8, aux_heads=aux_heads)


@pytest.mark.parametrize(("name", "stage"), COMBOS, ids=COMBO_IDS)
def test_fusion_head_exports_to_onnx_and_runtime_matches_torch_at_new_batch_and_length(
    name: str, stage: str, tmp_path: Path
) -> None:
    graph = FusionHeadGraph(_tiny_model(make_fusion(name, stage))).eval()
    dummy = features([7, 3])  # export at batch 2, sequence 7
    path = tmp_path / "fusion_head.onnx"
    b, bs = {0: "batch"}, {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, dummy, str(path), input_names=INPUT_NAMES, output_names=["probabilities"],
            dynamic_axes={"image_features": b, "image_regions": b, "text_features": b, "text_tokens": bs,
                          "attention_mask": bs, "probabilities": b},
            opset_version=17, dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for lengths in ([11, 4, 1], [2, 2, 5, 13, 8]):  # batch 3 / 5, sequence 11 / 13
        inputs = features(lengths, seed=len(lengths))
        with torch.no_grad():
            expected = graph(*inputs).numpy()
        feeds = dict(zip(INPUT_NAMES, (t.numpy() for t in inputs), strict=True))
        got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
        assert got.shape == (len(lengths), C)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_registry_refuses_a_second_strategy_under_an_existing_name() -> None:
    def impostor(*args: object, **kwargs: object) -> Fusion:
        raise AssertionError("must never be registered")

    with pytest.raises(ValueError, match="'concat' is already registered"):
        FUSIONS.register("concat")(impostor)
    assert FUSIONS.get("concat") is build_concat
    with pytest.raises(ValueError, match="already registered"):
        SEQUENCE_STAGES.register("bilstm")(impostor)


def test_every_requested_strategy_and_stage_is_registered() -> None:
    assert set(FUSIONS.names()) >= {"concat", "weighted_sum", "gmu", "cross_attention", "late"}
    assert SEQUENCE_STAGES.names() == ["bilstm", "none", "transformer"]


def test_unknown_sequence_stage_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="bilstm"):
        build_sequence_stage("lstm", H)
    with pytest.raises(KeyError, match="transformer"):
        make_fusion("gmu", "gru")


@pytest.mark.parametrize("stage", SEQUENCE_STAGES.names())
def test_late_fusion_output_is_exactly_the_mean_of_its_modality_logits(stage: str) -> None:
    fusion = make_fusion("late", stage).eval()
    assert isinstance(fusion, LateFusion)
    inputs = features([6, 1, 3])
    with torch.no_grad():
        image_logits, text_logits = fusion.modality_logits(*inputs)
        out = fusion(*inputs)
    assert image_logits.shape == text_logits.shape == (3, C)
    assert not torch.equal(image_logits, text_logits)
    torch.testing.assert_close(out, (image_logits + text_logits) / 2, atol=0, rtol=0)


def test_late_fusion_without_num_classes_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        FUSIONS.get("late")(DI, DT, H)


def test_fusion_model_puts_no_classifier_on_a_fusion_that_outputs_logits() -> None:
    fusion = make_fusion("late", "none")
    model = _tiny_model(fusion).eval()
    assert model.classifier is None
    assert not any(k.startswith("classifier.") for k in model.state_dict())
    inputs = features([3, 5])
    with torch.no_grad():
        torch.testing.assert_close(model.classify_features(*inputs), fusion(*inputs), atol=0, rtol=0)
    with pytest.raises(ValueError, match="7 classes"):
        FusionModel(SmallCNN(width=4, out_dim=DI), BiLSTMText(30, 8, DT // 2), fusion, 7)


def test_aux_logits_give_per_modality_class_scores_and_train_both_encoders_heads() -> None:
    model = _tiny_model(make_fusion("gmu", "none"), aux_heads=True)
    ip, _, tp, _, _ = features([2, 4])
    image_logits, text_logits = model.aux_logits(ip, tp)
    assert image_logits.shape == text_logits.shape == (2, C)
    y = torch.tensor([0, 3])
    loss = torch.nn.functional.cross_entropy(image_logits, y) + torch.nn.functional.cross_entropy(text_logits, y)
    loss.backward()
    assert model.aux_image is not None and model.aux_image.proj.weight.grad is not None
    assert model.aux_text is not None and model.aux_text.proj.weight.grad is not None


def test_aux_logits_without_aux_heads_is_a_clear_error_and_adds_no_parameters() -> None:
    model = _tiny_model(make_fusion("concat", "none"))
    assert not any(k.startswith("aux_") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="aux_heads=True"):
        model.aux_logits(torch.randn(1, DI), torch.randn(1, DT))


def test_gmu_follows_the_gated_multimodal_unit_equations() -> None:
    fusion = make_fusion("gmu", "none").eval()
    ip, ir, tp, tt, mask = features([3])
    with torch.no_grad():
        h_v = torch.tanh(ip @ fusion.image_in.weight.T)
        h_t = torch.tanh(tp @ fusion.text_in.weight.T)
        z = torch.sigmoid(torch.cat([ip, tp], -1) @ fusion.gate.weight.T)
        torch.testing.assert_close(fusion(ip, ir, tp, tt, mask), z * h_v + (1 - z) * h_t)


def test_weighted_sum_weights_are_a_distribution_that_really_weights_the_modalities() -> None:
    fusion = make_fusion("weighted_sum", "none").eval()
    torch.testing.assert_close(fusion.modality_weights().sum(), torch.tensor(1.0))
    with torch.no_grad():
        fusion.weight_logits.copy_(torch.tensor([40.0, -40.0]))  # all weight on the image
        a = features([3], seed=0)
        b = features([3], seed=5)
        only_text_changed = fusion(a[0], a[1], b[2], b[3], b[4])
        torch.testing.assert_close(only_text_changed, fusion(*a), atol=1e-6, rtol=0)


def test_cross_attention_refuses_more_regions_than_its_position_table() -> None:
    fusion = FUSIONS.get("cross_attention")(DI, DT, H, num_regions=4)
    with pytest.raises(ValueError, match="num_regions=9"):
        fusion(*features([2]))


def test_cross_attention_output_depends_on_where_a_region_is() -> None:
    """Learned positions: swapping two regions' contents changes the output."""
    fusion = make_fusion("cross_attention", "none").eval()
    ip, ir, tp, tt, mask = features([4])
    swapped = ir.clone()
    swapped[:, [0, 1]] = ir[:, [1, 0]]
    with torch.no_grad():
        assert not torch.allclose(fusion(ip, ir, tp, tt, mask), fusion(ip, swapped, tp, tt, mask), atol=1e-6)


def test_concat_without_a_stage_keeps_its_parameter_names_so_old_checkpoints_load() -> None:
    assert set(make_fusion("concat", "none").state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.3.weight",
                                                               "mlp.3.bias"}


def test_train_config_defaults_keep_older_configs_loadable() -> None:
    cfg = TrainConfig.from_dict({"fusion": "concat", "epochs": 1})
    assert (cfg.sequence_stage, cfg.aux_weight, cfg.fusion_kwargs) == ("none", 0.0, {})


# -- end to end: train one epoch, export, classify through the server ---------------------------------------

E2E = [("concat", "none", 0.0), ("weighted_sum", "bilstm", 0.0), ("gmu", "transformer", 0.5),
       ("cross_attention", "transformer", 0.0), ("late", "bilstm", 0.5)]
"""Every strategy once; the stages and the auxiliary loss ride along so each is wired end to end too."""


@pytest.mark.parametrize(("name", "stage", "aux_weight"), E2E, ids=[e[0] for e in E2E])
def test_strategy_trains_exports_and_serves_classification(
    name: str, stage: str, aux_weight: float, tiny_config: TrainConfig, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app
    from model.export import export_bundle
    from model.train import load_run, train

    # One torch thread: with two, OpenMP's spin-waiting made training 5-7x slower whenever the CPUs were shared.
    cfg = dataclasses.replace(tiny_config, fusion=name, sequence_stage=stage, aux_weight=aux_weight, epochs=1,
                              run_dir=str(tmp_path / "run"), fusion_kwargs={"num_heads": 2}, num_threads=1)
    run_dir = train(cfg, progress=False)
    model, loaded_cfg, _ = load_run(run_dir)
    assert (loaded_cfg.fusion, loaded_cfg.sequence_stage) == (name, stage)
    assert model.fusion.sequence_stage == stage, "model/build.py did not pass the sequence stage"
    assert (model.aux_image is not None) == (aux_weight > 0), "model/build.py did not honour aux_weight"
    manifest = export_bundle(run_dir, tmp_path / "bundle", real_samples=8, progress=False)
    assert manifest.model.fusion == name
    assert manifest.parity.max_abs_prob_diff <= 1e-4

    settings = Settings(bundle=tmp_path / "bundle", index_path=tmp_path / "index", intra_op_threads=1,
                        decode_threads=1, providers="CPUExecutionProvider")
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/classify", files={"image": ("a.png", demo_png(cfg.demo_dir), "image/png")},
                        data={"text": "what color is the circle?"})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert sorted(p["label"] for p in predictions) == sorted(manifest.labels)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)
