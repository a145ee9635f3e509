"""Pre-training data: BERT's masking statistics, whole words, next-sentence pairs, XLNet's
permutation masks (checked against the order and through XLNetLMHeadModel), packing."""

from __future__ import annotations

import pytest
import torch

from instructkit.data.pretrain import (
    IGNORE_INDEX,
    bert_pair,
    maskable_positions,
    mlm_mask,
    nsp_pairs,
    pack_blocks,
    perm_mask_from_order,
    plm_collate,
    plm_order,
    word_ids_from_wordpiece,
)
from instructkit.errors import InputError

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = [PAD, CLS, SEP, MASK]
VOCAB = 1000


def _bert_rows(g: torch.Generator, n_rows: int, width: int = 128) -> torch.Tensor:
    """[CLS] tokens [SEP] then padding, real lengths from 60 to ``width``."""
    rows = torch.full((n_rows, width), PAD)
    for r in range(n_rows):
        n = int(torch.randint(60, width + 1, (), generator=g))
        rows[r, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        rows[r, 0], rows[r, n - 1] = CLS, SEP
    return rows


def test_mlm_masking_statistics():
    """Over 3,000 rows (~270,000 maskable tokens, ~40,000 chosen): 15% of the maskable tokens are
    chosen, and of the chosen 80% show [MASK], 10% a random token, 10% themselves, each within
    one point. A random draw lands on the original token (or on [MASK]) with probability 1/1000,
    which moves the 10% shares by 0.01 point only. Specials and padding are never chosen."""
    g = torch.Generator().manual_seed(0)
    rows = _bert_rows(g, 3000)
    maskable = maskable_positions(rows, SPECIAL, attention_mask=rows != PAD)
    chosen = masked = random = kept = 0
    for ids, ok in zip(rows, maskable):
        inputs, labels = mlm_mask(ids, ok, mask_token_id=MASK, vocab_size=VOCAB, generator=g)
        at = labels != IGNORE_INDEX
        assert not (at & ~ok).any(), "a special token or padding was chosen"
        assert torch.equal(labels[at], ids[at]) and torch.equal(inputs[~at], ids[~at])
        chosen += int(at.sum())
        masked += int((inputs[at] == MASK).sum())
        kept += int((inputs[at] == ids[at]).sum())
        random += int(((inputs[at] != MASK) & (inputs[at] != ids[at])).sum())
    assert chosen / int(maskable.sum()) == pytest.approx(0.15, abs=0.01)
    assert masked / chosen == pytest.approx(0.8, abs=0.01)
    assert random / chosen == pytest.approx(0.1, abs=0.01)
    assert kept / chosen == pytest.approx(0.1, abs=0.01)


def test_mlm_random_tokens_come_from_the_whole_vocabulary():
    """The 10% random replacements are uniform over the vocabulary: in one long row they take
    many distinct values, spread over both halves of the id range."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (100_000,), generator=g)
    inputs, labels = mlm_mask(
        ids, torch.ones_like(ids, dtype=torch.bool), mask_token_id=MASK, vocab_size=VOCAB, generator=g
    )
    at = labels != IGNORE_INDEX
    swapped = inputs[at & (inputs != MASK) & (inputs != ids)]
    assert len(swapped) == pytest.approx(1500, rel=0.15)
    assert len(set(swapped.tolist())) > 700
    assert 0.4 < (swapped < VOCAB // 2).float().mean().item() < 0.6


def test_whole_word_masking_never_splits_a_word():
    """Words of 1 to 4 sub-tokens: every word is chosen whole or not at all, and about 15% of
    the tokens are chosen (the last word that does not fit may leave the count just under)."""
    g = torch.Generator().manual_seed(2)
    chosen = total = 0
    for _ in range(1000):
        word_ids: list[int | None] = [None]
        for w in range(int(torch.randint(20, 40, (), generator=g))):
            word_ids += [w] * int(torch.randint(1, 5, (), generator=g))
        word_ids.append(None)
        ids = torch.randint(4, VOCAB, (len(word_ids),), generator=g)
        ids[0], ids[-1] = CLS, SEP
        _, labels = mlm_mask(
            ids, maskable_positions(ids, SPECIAL), mask_token_id=MASK, vocab_size=VOCAB, generator=g, word_ids=word_ids
        )
        at = (labels != IGNORE_INDEX).tolist()
        for w in set(x for x in word_ids if x is not None):
            states = {at[p] for p, x in enumerate(word_ids) if x == w}
            assert len(states) == 1, f"word {w} was split"
        chosen += sum(at)
        total += len(word_ids) - 2
    assert chosen / total == pytest.approx(0.15, abs=0.01)


def test_word_ids_from_wordpiece_and_from_a_fast_tokenizer_agree():
    """``##`` continues a word, specials belong to none; the same groups as BertTokenizerFast's
    ``word_ids()`` (whose ids restart in the second segment: positions, not ids, group)."""
    from transformers import BertTokenizerFast

    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "un",
        "##aff",
        "##able",
        "the",
        "cat",
        "##s",
        "run",
        "##ning",
    ]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    enc = tok("the unaffable cats running", "the cat")
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    ours = word_ids_from_wordpiece(tokens, tok.all_special_tokens)
    assert ours == [None, 0, 1, 1, 1, 2, 2, 3, 3, None, 4, 5, None]
    theirs = enc.word_ids()
    same_word = lambda w: [[w[i] is not None and w[i] == w[i + 1] for i in range(len(w) - 1)]]  # noqa: E731
    assert same_word(ours) == same_word(theirs)
    ids = torch.tensor(enc.input_ids)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):  # "unaffable" (3 tokens) is masked whole whenever it is masked at all
        _, labels = mlm_mask(
            ids,
            maskable_positions(ids, tok.all_special_ids),
            mask_token_id=tok.mask_token_id,
            vocab_size=len(tok),
            generator=g,
            probability=0.3,
            word_ids=theirs,
        )
        assert len({bool(labels[p] != IGNORE_INDEX) for p in (2, 3, 4)}) == 1


def test_mlm_rejects_a_bad_probability():
    with pytest.raises(InputError, match="mlm_probability"):
        mlm_mask(torch.tensor([5, 6]), torch.tensor([True, True]), mask_token_id=MASK, vocab_size=9,
                 generator=torch.Generator(), probability=1.5)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# NSP


def test_nsp_labels_balanced_and_random_segments_really_random():
    """200 documents x 60 segments: 11,800 pairs, half (within 2 points) with a random second
    segment. Each segment's ids encode (document, segment), so the test reads where B came from:
    a label-0 B is A's next segment, a label-1 B is from another document, and the random ones
    are spread over (nearly) every other document and over segment positions."""
    docs = [[[1000 + d, 5000 + s] for s in range(60)] for d in range(200)]
    pairs = nsp_pairs(docs, torch.Generator().manual_seed(4))
    assert len(pairs) == 200 * 59
    share = sum(p.is_random for p in pairs) / len(pairs)
    assert share == pytest.approx(0.5, abs=0.02)
    random_sources = set()
    for p in pairs:
        (da, sa), (db, sb) = (p.a[0] - 1000, p.a[1] - 5000), (p.b[0] - 1000, p.b[1] - 5000)
        assert (da, sa) == p.a_from and (db, sb) == p.b_from
        if p.is_random:
            assert db != da
            random_sources.add((da, db, sb))
        else:
            assert (db, sb) == (da, sa + 1)
    assert len({db for _, db, _ in random_sources}) == 200
    assert len({sb for _, _, sb in random_sources}) == 60


def test_nsp_needs_two_documents():
    with pytest.raises(InputError, match="two documents"):
        nsp_pairs([[[5], [6]]], torch.Generator())


def test_bert_pair_layout_and_truncation():
    """[CLS] a [SEP] b [SEP]; types 0 through the first [SEP]. At max_length 8 the 7 + 2 tokens
    (+3 specials) lose 4 from the end of the longer segment, which stays the longer until 3 + 2."""
    enc = bert_pair([5, 6], [7], cls_id=CLS, sep_id=SEP, max_length=16)
    assert enc == {"input_ids": [CLS, 5, 6, SEP, 7, SEP], "token_type_ids": [0, 0, 0, 0, 1, 1]}
    enc = bert_pair([10, 11, 12, 13, 14, 15, 16], [20, 21], cls_id=CLS, sep_id=SEP, max_length=8)
    assert enc["input_ids"] == [CLS, 10, 11, 12, SEP, 20, 21, SEP]
    assert enc["token_type_ids"] == [0] * 5 + [1] * 3


# ----------------------------------------------------------------------------------------------
# PLM


def _factorisation_order(rank: list[int], predicted: list[bool]) -> list[int]:
    """The order z as a list of positions: context first (in position order; they see each
    other anyway), then the predicted positions by rank."""
    context = [p for p, t in enumerate(predicted) if not t]
    return context + sorted((p for p, t in enumerate(predicted) if t), key=lambda p: rank[p])


def test_plm_masks_obey_the_factorisation_order():
    """For every pair (i, j): perm_mask[b, i, j] == 1 exactly when j is predicted and j does not
    come before i in z; written here as a loop over z, not as the library's comparison."""
    g = torch.Generator().manual_seed(5)
    examples = []
    for n in (13, 9, 20, 6):
        ids = torch.randint(4, VOCAB, (n,), generator=g)
        ids[0], ids[-1] = CLS, SEP
        rank, predicted = plm_order(maskable_positions(ids, SPECIAL), g, predict_fraction=1 / 3)
        assert int(predicted.sum()) == round((n - 2) / 3)
        assert not predicted[0] and not predicted[-1]
        examples.append({"input_ids": ids.tolist(), "rank": rank.tolist(), "predicted": predicted.tolist()})
    batch = plm_collate(examples, PAD)
    B, T = 4, 20
    P = max(sum(e["predicted"]) for e in examples)
    assert batch["perm_mask"].shape == (B, T, T) and batch["perm_mask"].dtype == torch.float32
    assert batch["target_mapping"].shape == (B, P, T) and batch["target_mapping"].dtype == torch.float32
    assert batch["labels"].shape == (B, P)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        z = _factorisation_order(e["rank"], e["predicted"])
        where_in_z = {p: k for k, p in enumerate(z)}
        for i in range(T):
            for j in range(T):
                if j >= n:
                    expected = 0.0  # padding is context (and attention_mask hides it)
                else:  # a padding row i is context too: before everything in z
                    expected = float(e["predicted"][j] and not where_in_z[j] < where_in_z.get(i, -1))
                assert batch["perm_mask"][b, i, j].item() == expected, (b, i, j)
        # target_mapping: one-hot rows over the predicted positions (in position order), then zero rows
        targets = [p for p in range(n) if e["predicted"][p]]
        tm = batch["target_mapping"][b]
        assert tm[: len(targets)].sum(1).tolist() == [1.0] * len(targets)
        assert tm[: len(targets)].argmax(1).tolist() == targets
        assert tm[len(targets) :].abs().sum().item() == 0.0
        assert batch["labels"][b, : len(targets)].tolist() == [e["input_ids"][p] for p in targets]
        assert (batch["labels"][b, len(targets) :] == IGNORE_INDEX).all()


def test_plm_mask_agrees_with_transformers_collator_on_its_own_order():
    """transformers' DataCollatorForPermutationLanguageModeling writes the same relation with its
    own order: feeding its rule (``perm_index[i] <= perm_index[j] and j masked``, context at -1)
    the order we drew gives our mask."""
    g = torch.Generator().manual_seed(6)
    maskable = torch.ones(10, dtype=torch.bool)
    rank, predicted = plm_order(maskable, g, predict_fraction=0.5)
    perm_index = rank.clone()  # context -1, predicted by rank: the collator's perm_index convention
    theirs = (perm_index.reshape(10, 1) <= perm_index.reshape(1, 10)) & predicted
    assert torch.equal(perm_mask_from_order(rank, predicted), theirs.float())


def test_xlnet_predictions_see_only_earlier_tokens_in_the_order():
    """Through a tiny XLNetLMHeadModel: the logits of a predicted position do not change when its
    own token or a later-predicted token changes, and do change for an earlier-predicted one. So
    perm_mask leaks nothing and XLNet's two-stream attention reads it as we mean it."""
    from transformers import XLNetConfig, XLNetLMHeadModel

    torch.manual_seed(0)
    model = XLNetLMHeadModel(XLNetConfig(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_inner=32)).eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 50, (12,), generator=g)
    rank, predicted = plm_order(torch.ones(12, dtype=torch.bool), g, predict_fraction=0.5)
    example = {"input_ids": ids.tolist(), "rank": rank.tolist(), "predicted": predicted.tolist()}
    targets = predicted.nonzero().flatten().tolist()  # row p of the logits scores targets[p]
    by_rank = sorted(targets, key=lambda p: int(rank[p]))

    def logits_with(position: int) -> torch.Tensor:
        changed = dict(
            example, input_ids=[(t + 7) % 46 + 4 if k == position else t for k, t in enumerate(ids.tolist())]
        )
        with torch.no_grad():
            return model(**plm_collate([changed], PAD)).logits[0]

    with torch.no_grad():
        base = model(**plm_collate([example], PAD)).logits[0]
    middle = by_rank[len(by_rank) // 2]
    row = targets.index(middle)
    for p in by_rank:
        moved = not torch.allclose(logits_with(p)[row], base[row], atol=1e-6)
        assert moved == (rank[p] < rank[middle]), (p, int(rank[p]), int(rank[middle]))


# ----------------------------------------------------------------------------------------------
# CLM packing


def test_pack_blocks_by_hand():
    """Stream 1 2 eos 3 eos 4 5 6 eos (9 tokens): blocks of 3 use all of it; blocks of 4 leave 1."""
    docs = [[1, 2], [3], [4, 5, 6]]
    assert pack_blocks(docs, 3, eos_id=0) == ([[1, 2, 0], [3, 0, 4], [5, 6, 0]], 0)
    assert pack_blocks(docs, 4, eos_id=0) == ([[1, 2, 0, 3], [0, 4, 5, 6]], 1)
    with pytest.raises(InputError, match="max_length"):
        pack_blocks(docs, 1, eos_id=0)
