"""Recoverable Compression against a slow loop-based reference, plus its properties (budget, batch, dtype)."""

import math
import warnings
from fractions import Fraction

import pytest
import torch

from llava_rc.compression_common import CompressionInputs, TokenPlan, apply_plan, cls_attention, resolve_budget
from llava_rc.compression_common import stable_descending_order, stable_topk_indices
from llava_rc.compression_lof import lof_outlier_count
from llava_rc.compression_rc import RCConfig, compress_rc
from llava_rc.compression_registry import parse_compression

sklearn_neighbors = pytest.importorskip("sklearn.neighbors")


def random_inputs(
    num_images: int, num_patches: int, width: int = 32, *, seed: int = 0, tied: bool = False, dtype=torch.float32
) -> CompressionInputs:
    """Random inputs whose images differ in how peaky the [CLS] attention is (so the adaptive counts differ).

    tied: patches come in pairs with identical keys and text scores, so attention and scores tie exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    num_heads, head_dim = 4, 8
    attention_width = num_heads * head_dim
    keys = torch.randn(num_images, 1 + num_patches, attention_width, generator=generator)
    query = torch.randn(num_images, attention_width, generator=generator)
    for image in range(num_images):
        # A few patches aligned with the query stand out; how many and how strongly varies per image.
        standouts = torch.randperm(num_patches, generator=generator)[: 2 + 5 * image]
        keys[image, 1 + standouts] += (1.0 + image) * query[image] / query[image].norm() * 4.0
        query[image] *= 0.5 + image
    text_scores = torch.rand(num_images, num_patches, generator=generator) * 2 - 1
    if tied:
        keys[:, 2::2] = keys[:, 1:-1:2]  # patch 2j + 1 copies patch 2j (keys start with [CLS])
        text_scores[:, 1::2] = text_scores[:, 0::2]
    return CompressionInputs(
        features=torch.randn(num_images, num_patches, width, generator=generator).to(dtype),
        cls_query=query.to(dtype),
        attention_keys=keys.to(dtype),
        num_heads=num_heads,
        text_scores=text_scores,
        guidance_dim=32,
        has_text=torch.arange(num_images) % 3 != 1,  # image 1 has no question
    )


def sklearn_outlier_count(values: torch.Tensor, n_neighbors: int) -> int:
    if len(values) < 2:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = sklearn_neighbors.LocalOutlierFactor(n_neighbors=n_neighbors, contamination="auto")
        return int((detector.fit_predict(values.numpy().reshape(-1, 1)) == -1).sum())


def dynamic_ratio(values: torch.Tensor, n_neighbors: int) -> Fraction:
    return Fraction(sklearn_outlier_count(values, n_neighbors), max(len(values), 1))


def reference_rc(inputs: CompressionInputs, config: RCConfig) -> list[tuple[list[int], list[torch.Tensor]]]:
    """The adaptive algorithm step by step, one image and one centre at a time: (sources, output vectors).

    Transcribed from the released algorithm's description (module docstring and docs/rc.md): with
    ``centre_candidates="released"`` a centre picks from every other remaining patch, other centres included.
    """
    attention_all = cls_attention(inputs, per_head=False)
    scale_dim = config.text_scale_dim if config.text_scale_dim is not None else inputs.guidance_dim
    outputs = []
    for image in range(inputs.num_images):
        features = inputs.features[image].double()
        attention = attention_all[image]
        num_patches = len(attention)
        use_text = config.guidance is not None and inputs.text_scores is not None and bool(inputs.has_text[image])
        scores = inputs.text_scores[image].float() / math.sqrt(scale_dim)

        def by_attention(patch):
            return (-attention[patch].item(), patch)

        visual_count = math.floor(num_patches * dynamic_ratio(attention, config.lof_neighbors_visual))
        visual = sorted(range(num_patches), key=by_attention)[:visual_count]
        recovered = []
        if use_text:
            replaced = scores.clone()
            replaced[visual] = scores.min()
            text_ratio = dynamic_ratio(replaced, config.lof_neighbors_text)
            recovered_count = math.floor((num_patches - visual_count) * text_ratio)
            others = [patch for patch in range(num_patches) if patch not in visual]
            recovered = sorted(others, key=lambda patch: (-scores[patch].item(), patch))[:recovered_count]
        kept = sorted(visual + recovered)
        remaining = [patch for patch in range(num_patches) if patch not in kept]
        centre_count = math.floor(len(remaining) * dynamic_ratio(attention[remaining], config.lof_neighbors_merge))
        if not kept and centre_count == 0:  # nothing chosen: the top patch by attention alone
            top = sorted(range(num_patches), key=by_attention)[0]
            outputs.append(([top], [features[top]]))
            continue
        centres = sorted(remaining, key=by_attention)[:centre_count]
        absorbed = [patch for patch in remaining if patch not in centres]

        sources = list(kept)
        vectors = [features[patch] for patch in kept]
        keys = inputs.patch_keys[image].float()
        for centre in centres:
            def candidate_score(patch):
                cosine = torch.nn.functional.cosine_similarity(keys[centre], keys[patch], dim=0, eps=1e-12)
                text = config.text_weight * scores[patch] if use_text else 0.0
                return (-(cosine + text).item(), patch)

            if config.centre_candidates == "released":
                pool = [patch for patch in remaining if patch != centre]
            else:
                pool = absorbed
            chosen = sorted(pool, key=candidate_score)[: config.merge_neighbors]
            sources.append(centre)
            vectors.append(features[centre] + sum(attention[patch].double() * features[patch] for patch in chosen))
        if centre_count > 0:
            sources.append(-1)
            vectors.append(sum(attention[patch].double() * features[patch] for patch in absorbed))
        outputs.append((sources, vectors))
    return outputs


def assert_matches_reference(inputs: CompressionInputs, config: RCConfig):
    plan = compress_rc(inputs, config)
    merged = apply_plan(inputs.features, plan)
    for image, (sources, vectors) in enumerate(reference_rc(inputs, config)):
        count = int(plan.counts[image])
        assert plan.source_index[image, :count].tolist() == sources
        assert (plan.source_index[image, count:] == -1).all()
        assert (plan.dense_weights()[image, count:] == 0).all()
        torch.testing.assert_close(merged[image, :count].double(), torch.stack(vectors), rtol=1e-5, atol=1e-5)
    return plan


@pytest.mark.parametrize(
    "num_images, num_patches, config, tied",
    [
        (1, 64, RCConfig(), False),
        (4, 100, RCConfig(), False),
        (3, 144, RCConfig(merge_neighbors=4, lof_neighbors_merge=5), False),
        (2, 64, RCConfig(merge_neighbors=200), False),  # fewer candidates than merge_neighbors
        (3, 81, RCConfig(guidance=None), False),
        (3, 64, RCConfig(text_weight=0.0, lof_neighbors_visual=10), True),  # exact ties: lower index first
        (2, 576, RCConfig(), False),
        (3, 100, RCConfig(centre_candidates="non_centres"), False),
        (3, 64, RCConfig(centre_candidates="non_centres", text_weight=0.0, lof_neighbors_visual=10), True),
        (2, 144, RCConfig(text_scale_dim=768), False),
        (3, 16, RCConfig(merge_neighbors=4, lof_neighbors_merge=3), False),
    ],
)
def test_matches_loop_reference(num_images, num_patches, config, tied):
    inputs = random_inputs(num_images, num_patches, width=16 if num_patches > 200 else 32, seed=num_patches, tied=tied)
    plan = assert_matches_reference(inputs, config)
    if num_images > 2 and config.guidance is not None:
        assert len(set(plan.counts.tolist())) > 1, "the test should cover images with different counts"


def test_batch_invariance_and_determinism():
    inputs = random_inputs(4, 100, seed=3)
    config = RCConfig()
    plan = compress_rc(inputs, config)
    again = compress_rc(inputs, config)
    assert torch.equal(plan.source_index, again.source_index) and torch.equal(plan.dense_weights(), again.dense_weights())
    for image in range(4):
        single = CompressionInputs(
            features=inputs.features[image : image + 1],
            cls_query=inputs.cls_query[image : image + 1],
            attention_keys=inputs.attention_keys[image : image + 1],
            num_heads=inputs.num_heads,
            text_scores=inputs.text_scores[image : image + 1],
            guidance_dim=inputs.guidance_dim,
            has_text=inputs.has_text[image : image + 1],
        )
        alone = compress_rc(single, config)
        count = int(plan.counts[image])
        assert alone.counts.tolist() == [count]
        assert torch.equal(alone.source_index[0], plan.source_index[image, :count])
        assert torch.equal(alone.dense_weights()[0], plan.dense_weights()[image, :count])


@pytest.mark.parametrize("budget", [None, 40, 0.3])
def test_every_patch_is_accounted_for(budget):
    """Each patch is kept, a centre, absorbed by a centre or in the extra token; in the adaptive plan the
    remaining patches are dropped only when there is no centre (then the extra token is dropped too)."""
    inputs = random_inputs(4, 144, seed=5)
    plan = compress_rc(inputs, RCConfig(budget=budget))
    covered = plan.absorbed_for(inputs.num_patches).any(dim=1)  # (I, N)
    for image in range(inputs.num_images):
        count = int(plan.counts[image])
        sources = plan.source_index[image, :count]
        if (sources == -1).any():  # an extra token: everything is covered
            assert sources[-1] == -1 and (sources[:-1] >= 0).all()
            assert covered[image].all()
        else:  # no centre, no extra token: only the kept patches survive
            assert budget is None
            assert covered[image].sum() == count
        rows = (sources >= 0).nonzero().squeeze(-1)
        own = plan.dense_weights()[image, rows, sources[rows]]
        assert (own == 1).all()  # kept and centre rows weigh their own patch by 1


def test_no_text_path():
    inputs = random_inputs(3, 100, seed=7)
    vision_only = compress_rc(inputs, RCConfig(guidance=None))
    inputs.has_text = torch.zeros(3, dtype=torch.bool)
    without_question = compress_rc(inputs, RCConfig())
    assert torch.equal(vision_only.source_index, without_question.source_index)
    assert torch.equal(vision_only.dense_weights(), without_question.dense_weights())
    inputs.text_scores = None
    assert torch.equal(compress_rc(inputs, RCConfig()).source_index, vision_only.source_index)


@pytest.mark.parametrize("num_patches", [576, 144, 64])
def test_fixed_budget_gives_the_exact_count(num_patches):
    inputs = random_inputs(2, num_patches, width=16, seed=num_patches)
    for budget in [1, 2, 3, 16, 64, 0.1, 0.25, 0.5, num_patches - 1, 1.0, 10_000]:
        plan = compress_rc(inputs, RCConfig(budget=budget))
        expected = resolve_budget(budget, num_patches)
        assert plan.counts.tolist() == [expected, expected], budget
        assert plan.source_index.shape == (2, expected) and plan.dense_weights().shape == (2, expected, num_patches)
        if expected == num_patches:  # everything kept, nothing merged
            assert torch.equal(plan.source_index, torch.arange(num_patches).expand(2, -1))


def test_bfloat16_inputs():
    inputs = random_inputs(2, 64, seed=11, dtype=torch.bfloat16)
    plan = compress_rc(inputs, RCConfig())
    assert plan.dense_weights().dtype == torch.float32
    assert apply_plan(inputs.features, plan).dtype == torch.bfloat16
    upcast = CompressionInputs(
        features=inputs.features.float(),
        cls_query=inputs.cls_query.float(),
        attention_keys=inputs.attention_keys.float(),
        num_heads=inputs.num_heads,
        text_scores=inputs.text_scores,
        guidance_dim=inputs.guidance_dim,
        has_text=inputs.has_text,
    )
    assert torch.equal(plan.source_index, compress_rc(upcast, RCConfig()).source_index)


@pytest.mark.parametrize(
    "settings",
    [
        {"guidance": "bert"},
        {"lof_neighbors_visual": 0},
        {"lof_neighbors_text": 2.5},
        {"lof_neighbors_merge": True},
        {"merge_neighbors": -1},
        {"text_weight": -1.0},
        {"text_weight": float("nan")},
        {"text_weight": float("inf")},
        {"text_scale_dim": 0},
        {"text_scale_dim": 768.0},
        {"centre_candidates": "all"},
        {"cls_attention_layer": "last"},
        {"budget": 0},
        {"budget": 1.5},
        {"budget": float("nan")},
        {"budget": True},
    ],
)
def test_invalid_config_raises(settings):
    with pytest.raises(ValueError):
        RCConfig(**settings)


def test_registered():
    config = parse_compression({"method": "rc", "guidance": None, "budget": 64})
    assert isinstance(config, RCConfig) and config.budget == 64 and config.guidance_source is None
    assert RCConfig().to_dict()["method"] == "rc"


def dense_compress_rc(inputs: CompressionInputs, config: RCConfig) -> TokenPlan:
    """The previous implementation, kept as the reference for the merge: an (I, N, N) key-cosine matrix of which
    only the centre rows are used; candidates are the non-centre remaining patches; an empty plan stays empty."""
    attention = cls_attention(inputs, per_head=False)  # (I, N)
    num_images, num_patches = attention.shape

    def rank(scores, eligible):
        order = stable_descending_order(scores.masked_fill(~eligible, float("-inf")))
        return torch.empty_like(order).scatter_(1, order, torch.arange(num_patches).expand_as(order))

    text = None
    if config.guidance is not None and inputs.text_scores is not None:
        text = (inputs.text_scores.float() / math.sqrt(inputs.guidance_dim), inputs.has_text)

    def recover(visual, count):
        if text is None:
            return torch.zeros_like(visual)
        return rank(text[0], ~visual) < count.unsqueeze(-1)

    attention_rank = rank(attention, torch.ones_like(attention, dtype=torch.bool))
    visual_count = lof_outlier_count(attention, None, config.lof_neighbors_visual)
    visual = attention_rank < visual_count.unsqueeze(-1)
    recovered_count = torch.zeros_like(visual_count)
    if text is not None:
        scores, has_text = text
        replaced = scores.where(~visual, scores.min(dim=-1, keepdim=True).values)
        text_outliers = lof_outlier_count(replaced, None, config.lof_neighbors_text)
        recovered_count = ((num_patches - visual_count) * text_outliers // num_patches).where(has_text, 0)
    recovered = recover(visual, recovered_count)
    centre_count = lof_outlier_count(attention, ~(visual | recovered), config.lof_neighbors_merge)
    extra_count = (centre_count > 0).long()
    if config.budget is not None:
        from llava_rc.compression_rc import _budget_counts

        visual_count, recovered_count, centre_count, extra_count = _budget_counts(
            resolve_budget(config.budget, num_patches), num_patches, visual_count, recovered_count, centre_count,
            config.recovered_share, config.recovered_fill, text[1] if text is not None else None,
        )
        visual = attention_rank < visual_count.unsqueeze(-1)
        recovered = recover(visual, recovered_count)
    kept = visual | recovered
    remaining = ~kept
    centre_rank = rank(attention, remaining)
    centre = centre_rank < centre_count.unsqueeze(-1)
    absorbed = remaining & ~centre
    with_extra = absorbed & (extra_count > 0).unsqueeze(-1)
    keys = torch.nn.functional.normalize(inputs.patch_keys.float(), dim=-1)
    candidate_scores = keys @ keys.transpose(1, 2)  # (I, N, N)
    if text is not None:
        scores, has_text = text
        text_term = config.text_weight * scores.where(has_text.unsqueeze(-1), 0.0)
        candidate_scores = candidate_scores + text_term.unsqueeze(1)
    candidate_scores = candidate_scores.masked_fill(~absorbed.unsqueeze(1), float("-inf"))
    candidates = stable_topk_indices(candidate_scores, min(config.merge_neighbors, num_patches), largest=True)
    is_candidate = absorbed.gather(1, candidates.flatten(1)).view_as(candidates) & centre.unsqueeze(-1)
    kept_count = kept.sum(dim=-1)
    counts = kept_count + centre_count + extra_count
    max_count = int(counts.max())
    kept_row = kept.long().cumsum(dim=-1) - 1
    row = torch.full_like(kept_row, max_count)
    row = torch.where(with_extra, (kept_count + centre_count).unsqueeze(-1).expand(-1, num_patches), row)
    row = torch.where(centre, kept_count.unsqueeze(-1) + centre_rank, row)
    row = torch.where(kept, kept_row, row)
    own_weight = torch.where(kept | centre, 1.0, torch.where(with_extra, attention, 0.0))
    merge_weights = torch.zeros(num_images, max_count + 1, num_patches)
    merge_weights.scatter_(1, row.unsqueeze(1), own_weight.unsqueeze(1))
    candidate_row = torch.where(is_candidate, row.unsqueeze(-1), max_count)
    candidate_weight = attention.gather(1, candidates.flatten(1)).view_as(candidates) * is_candidate
    merge_weights.view(num_images, -1).scatter_add_(
        1, (candidate_row * num_patches + candidates).flatten(1), candidate_weight.flatten(1)
    )
    source_index = torch.full((num_images, max_count + 1), -1, dtype=torch.long)
    source_index.scatter_(1, torch.where(kept | centre, row, max_count), torch.arange(num_patches).expand_as(row))
    return TokenPlan(
        source_index=source_index[:, :max_count], counts=counts, merge_weights=merge_weights[:, :max_count]
    )


@pytest.mark.parametrize(
    "num_images, num_patches, width",
    [
        (1, 576, 16),
        pytest.param(8, 576, 8, marks=pytest.mark.slow),  # batch and N beyond the quick cases: the full run only
        pytest.param(2, 1152, 8, marks=pytest.mark.slow),
        (3, 100, 32),
    ],
)
def test_centre_merge_equals_dense_reference(num_images, num_patches, width):
    """The merge from centre x patch similarities gives bit-identical plans to the (I, N, N) version."""
    compared = 0
    for seed in range(3):
        for tied in [False, True]:
            inputs = random_inputs(num_images, num_patches, width=width, seed=seed, tied=tied)
            for budget in [None, 16, 0.25]:
                for guidance in ["llm", None]:
                    settings = {"budget": budget, "guidance": guidance}
                    expected = dense_compress_rc(inputs, RCConfig(**settings))
                    if (expected.counts == 0).any():  # the old empty plan; the new one keeps a token (own test)
                        continue
                    plan = compress_rc(inputs, RCConfig(centre_candidates="non_centres", **settings))
                    assert torch.equal(plan.counts, expected.counts), settings
                    assert torch.equal(plan.source_index, expected.source_index), settings
                    assert torch.equal(plan.dense_weights(), expected.dense_weights()), settings
                    compared += 1
    assert compared >= 30


def test_released_candidates_change_only_the_merged_vectors():
    """Released candidates (other centres included) vs non-centres: same counts and sources, and some centre
    absorbs another centre, so the merge weights differ there; kept rows and the extra token are the same."""
    inputs = random_inputs(4, 144, seed=9)
    released = compress_rc(inputs, RCConfig())
    ours = compress_rc(inputs, RCConfig(centre_candidates="non_centres"))
    assert torch.equal(released.counts, ours.counts) and torch.equal(released.source_index, ours.source_index)
    centre_rows = released.source_index >= 0
    absorbs_centre = False
    for image in range(inputs.num_images):
        sources = released.source_index[image, : int(released.counts[image])]
        centres = sources[(sources >= 0) & (released.dense_weights()[image, : len(sources)].count_nonzero(-1) > 1)]
        rows = released.dense_weights()[image, : len(sources)]
        absorbs_centre |= bool((rows[:, centres] != 0).sum() > len(centres))  # a centre column outside its own row
    assert absorbs_centre
    assert not torch.equal(released.dense_weights(), ours.dense_weights())
    assert centre_rows.any()


@pytest.mark.parametrize("budget", [None, 3])
def test_flat_attention_keeps_one_token(budget):
    """A zero [CLS] query: the attention is exactly flat, LOF flags nothing; the image keeps its top patch (0)."""
    inputs = random_inputs(2, 64, seed=1)
    inputs.cls_query = torch.zeros_like(inputs.cls_query)
    inputs.has_text = torch.zeros(2, dtype=torch.bool)
    plan = compress_rc(inputs, RCConfig(budget=budget))
    expected = 1 if budget is None else 3
    assert plan.counts.tolist() == [expected, expected]
    assert plan.source_index[:, 0].tolist() == [0, 0]


@pytest.mark.parametrize("num_patches", [1, 2, 3, 4, 5])
def test_few_patches_keep_at_least_one_token(num_patches):
    """N <= 5: LOF (k clamped to N - 1) rarely flags anything; every image keeps at least its top patch."""
    for seed in range(10):
        inputs = random_inputs(3, num_patches, seed=seed)
        plan = compress_rc(inputs, RCConfig())
        assert (plan.counts >= 1).all() and (plan.counts <= num_patches + 1).all()
        attention = cls_attention(inputs, per_head=False)
        for image in range(3):
            count = int(plan.counts[image])
            sources = plan.source_index[image, :count].tolist()
            if count == 1:
                assert sources == [int(stable_descending_order(attention[image : image + 1])[0, 0])]
        assert_matches_reference(inputs, RCConfig())


def test_text_scale_dim():
    """None = the guidance width; another width changes only the text term's weight in the merge."""
    inputs = random_inputs(3, 144, seed=4)
    default = compress_rc(inputs, RCConfig())
    same = compress_rc(inputs, RCConfig(text_scale_dim=inputs.guidance_dim))
    assert torch.equal(default.dense_weights(), same.dense_weights())
    released_constant = compress_rc(inputs, RCConfig(text_scale_dim=768))
    assert torch.equal(default.source_index, released_constant.source_index)  # LOF and rankings are scale-free
    assert not torch.equal(default.dense_weights(), released_constant.dense_weights())


def test_fixed_budget_path_compiles_without_graph_break():
    """With a budget the step has no host sync, so it traces as one graph (a GPU can capture it)."""
    inputs = random_inputs(2, 64, seed=2)
    config = RCConfig(budget=16)
    compiled = torch.compile(lambda batch: compress_rc(batch, config), fullgraph=True, backend="eager")
    plan, expected = compiled(inputs), compress_rc(inputs, config)
    assert torch.equal(plan.source_index, expected.source_index)
    assert torch.equal(plan.dense_weights(), expected.dense_weights())


# ---- How a budget is shared (recovered_share, recovered_fill) ---------------------------------------------------


def test_budget_counts_per_category():
    """The split on given adaptive counts: B = 14, so S = 13 slots besides the extra token."""
    from llava_rc.compression_rc import _budget_counts

    visual, recovered, centres = torch.tensor([32, 5, 0, 6]), torch.tensor([11, 1, 0, 0]), torch.tensor([4, 2, 0, 1])
    can_recover = torch.tensor([True, True, True, False])

    def split(share, fill):
        counts = _budget_counts(14, 144, visual, recovered, centres, share, fill, can_recover)
        return [count.tolist() for count in counts]

    # Proportions of the adaptive plan (before the setting existed): 13 * 11 // 47 = 3 recovered in image 0.
    assert split(None, "text") == [[9, 9, 13, 12], [3, 1, 0, 0], [1, 3, 0, 1], [1, 1, 1, 1]]
    # floor(13 * 0.5) = 6 reserved; "text" fills them wherever there is a question, the other 7 are shared
    # n_v : n_c (7 * 4 // 36 = 0, 7 * 2 // 7 = 2, no centres, 13 * 1 // 7 = 1).
    assert split(0.5, "text") == [[7, 5, 7, 12], [6, 6, 6, 0], [0, 2, 0, 1], [1, 1, 1, 1]]
    # "visual": only what LOF recovered (at most the 6), the rest returns to visual and centre tokens.
    assert split(0.5, "visual") == [[7, 9, 13, 12], [6, 1, 0, 0], [0, 3, 0, 1], [1, 1, 1, 1]]
    assert split(1.0, "text") == [[0, 0, 0, 12], [13, 13, 13, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert split(0.0, "text") == split(0.0, "visual") == [[12, 10, 13, 12], [0, 0, 0, 0], [1, 3, 0, 1], [1, 1, 1, 1]]
    for share in [None, 0.0, 0.3, 0.5, 1.0]:
        for fill in ["text", "visual"]:
            assert (sum(torch.tensor(c) for c in split(share, fill)) == 14).all()


def kept_and_centres(inputs, plan):
    """Per image: (patches kept as themselves, centre patches), from a plan's rows (a centre absorbs others)."""
    result = []
    for image in range(inputs.num_images):
        count = int(plan.counts[image])
        sources = plan.source_index[image, :count]
        rows = plan.dense_weights(inputs.num_patches)[image, :count]
        kept, centres = [], []
        for row, source in zip(rows, sources.tolist()):
            if source >= 0:
                (centres if int((row != 0).sum()) > 1 else kept).append(source)
        result.append((kept, centres))
    return result


@pytest.mark.parametrize("fill", ["text", "visual"])
def test_recovered_share_chooses_the_text_ranking(fill):
    """share 1: every non-extra slot is a recovered token, the top S by text score ("text" fill) or only the LOF
    recovered ones followed by visual tokens ("visual" fill); images without a question recover nothing."""
    inputs = random_inputs(3, 144, seed=21)
    budget = 14
    plan = compress_rc(inputs, RCConfig(budget=budget, recovered_share=1.0, recovered_fill=fill))
    attention = cls_attention(inputs, per_head=False)
    by_text = stable_descending_order(inputs.text_scores.float())
    by_attention = stable_descending_order(attention)
    for image, (kept, centres) in enumerate(kept_and_centres(inputs, plan)):
        assert plan.source_index[image, budget - 1] == -1  # the extra token
        if not inputs.has_text[image]:  # no question: all visual, by attention (and centres)
            assert set(kept) <= set(by_attention[image, : budget - 1].tolist())
        elif fill == "text":
            assert sorted(kept) == sorted(by_text[image, : budget - 1].tolist()) and centres == []
        else:
            assert len(kept) + len(centres) == budget - 1
    if fill == "visual":  # LOF recovers fewer than 13 here: the other slots go back to visual tokens
        with_question = [image for image in range(3) if inputs.has_text[image]]
        assert any(sorted(kept_and_centres(inputs, plan)[image][0]) != sorted(by_text[image, : budget - 1].tolist())
                   for image in with_question)


def test_reserved_slots_filled_by_text_beyond_the_lof_recovery():
    """Where LOF recovers fewer than reserved, "text" fill adds the next most text-similar patches and "visual"
    fill does not: the two plans differ exactly there, and both hold exactly the budget."""
    inputs = random_inputs(3, 144, seed=22)
    text_fill = compress_rc(inputs, RCConfig(budget=30, recovered_share=0.8, recovered_fill="text"))
    visual_fill = compress_rc(inputs, RCConfig(budget=30, recovered_share=0.8, recovered_fill="visual"))
    assert text_fill.counts.tolist() == visual_fill.counts.tolist() == [30, 30, 30]
    by_text = stable_descending_order(inputs.text_scores.float())
    differs = False
    for image, ((kept_text, _), (kept_visual, _)) in enumerate(
        zip(kept_and_centres(inputs, text_fill), kept_and_centres(inputs, visual_fill))
    ):
        text_rank = {patch: place for place, patch in enumerate(by_text[image].tolist())}
        if inputs.has_text[image] and kept_text != kept_visual:
            differs = True
            added = set(kept_text) - set(kept_visual)
            # What "text" fill adds ranks high by text: within the top (23 recovered + visual) by text score.
            assert max(text_rank[patch] for patch in added) < 23 + len(kept_visual)
        if not inputs.has_text[image]:
            assert kept_text == kept_visual
    assert differs


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("fill", ["text", "visual"])
def test_guidance_off_and_adaptive_plans_ignore_the_share(share, fill):
    """Vision-only RC at a budget, and adaptive RC (with text), are the same whatever the share and fill."""
    inputs = random_inputs(4, 144, seed=23)
    for settings in [{"guidance": None, "budget": 14}, {"guidance": None, "budget": 7}, {"budget": None}]:
        before = compress_rc(inputs, RCConfig(recovered_share=None, **settings))
        after = compress_rc(inputs, RCConfig(recovered_share=share, recovered_fill=fill, **settings))
        assert torch.equal(before.source_index, after.source_index), settings
        assert torch.equal(before.dense_weights(), after.dense_weights()), settings
    assert_matches_reference(inputs, RCConfig(recovered_share=share, recovered_fill=fill))


def test_share_zero_is_the_vision_only_selection():
    """share 0 keeps no recovered token: the kept and centre patches are those of guidance=None (the merged
    vectors differ: the text term still weighs a centre's candidates)."""
    inputs = random_inputs(3, 144, seed=24)
    for budget in [7, 14, 0.25]:
        guided = compress_rc(inputs, RCConfig(budget=budget, recovered_share=0.0))
        vision_only = compress_rc(inputs, RCConfig(budget=budget, guidance=None))
        assert torch.equal(guided.source_index, vision_only.source_index), budget


@pytest.mark.parametrize("settings", [{"recovered_share": -0.1}, {"recovered_share": 1.5},
                                      {"recovered_share": "half"}, {"recovered_fill": "outliers"}])
def test_invalid_share_settings_raise(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        RCConfig(budget=14, **settings)
