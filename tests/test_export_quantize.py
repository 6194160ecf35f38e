"""int8 quantization: per-channel dynamic MatMuls, and the accuracy-aware search that keeps the worst in fp32."""

from __future__ import annotations

import numpy as np
import pytest

from vitcli.export.quantize import accuracy_aware_int8, mean_kl, quantize_int8, top1_agreement, weight_matmuls


@pytest.fixture(scope="module")
def tiny_proto(tiny_model_dir, tmp_path_factory):
    import onnx

    from vitcli.export.job import export_model
    from vitcli.export.options import ExportOptions

    options = ExportOptions(output=tmp_path_factory.mktemp("q") / "tiny", verify=False)
    return onnx.load(str(export_model(str(tiny_model_dir), options=options).files[0].path))


def fp32_matmuls(proto) -> set[str]:
    return {n.name for n in proto.graph.node if n.op_type == "MatMul"}


def test_quantize_int8_turns_weight_matmuls_into_integer_ops_except_excluded(tiny_proto):
    nodes = weight_matmuls(tiny_proto)
    assert len(nodes) >= 4 * 2  # qkv, proj, fc1, fc2 per block
    q = quantize_int8(tiny_proto, exclude=nodes[:2])
    assert set(nodes[:2]) <= fp32_matmuls(q)
    assert not set(nodes[2:]) & fp32_matmuls(q)
    assert sum(n.op_type == "MatMulInteger" for n in q.graph.node) >= len(nodes) - 2


def test_accuracy_aware_keeps_the_harmful_matmuls_in_fp32(tiny_proto):
    """A stand-in runtime where two MatMuls, when quantized, flip the top-1 of a third of the images each:
    the search must rank exactly those two first and stop once both are fp32."""
    nodes = weight_matmuls(tiny_proto)
    harmful = [nodes[5], nodes[2]]
    reference = np.random.default_rng(0).standard_normal((30, 3)) + np.array([5.0, 0, 0])

    def run(proto, batch):
        logits = reference[: len(batch)].copy()
        for k, name in enumerate(harmful):
            if name not in fp32_matmuls(proto):  # quantized: flip this MatMul's share of images
                logits[k * 10:(k + 1) * 10, 0] -= 10.0 * (k + 1)
        return logits

    calibration = np.zeros((30, 3, 8, 8), dtype=np.float32)
    result = accuracy_aware_int8(tiny_proto, run, calibration, target=0.99)
    assert sorted(result.kept_fp32) == sorted(harmful)
    assert result.kept_fp32[0] == nodes[2]  # the one that moves the output most ranks first
    assert result.calibration_agreement == 1.0
    assert result.steps[0][1] == pytest.approx(1 / 3) and result.steps[-1] == (2, 1.0)
    assert result.quantized == len(nodes) - 2


def test_agreement_and_kl():
    a = np.array([[3.0, 1.0], [0.0, 2.0]])
    assert top1_agreement(a, a) == 1.0 and mean_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    assert top1_agreement(a, a[:, ::-1]) == 0.0 and mean_kl(a, a[:, ::-1]) > 0.5
