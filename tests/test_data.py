"""jlora.data: loading (every format and error), target masks (a hand-built tokenizer for exact masks, the real
SmolLM2 chat template for assistant spans), packing/padding, overflow, and exact determinism / resumption."""

import json
import warnings

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from jlora.data import Batches, Example, load_examples, make_batches, split_examples, tokenize_example
from jlora.tokenizer import Tokenizer, load_tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Q", ":", "A", "what", "is", "two", "plus", "four", "hello", "world",
          "the", "cat", "sat"]


@pytest.fixture(scope="module")
def tiny_tok():
    """A word-level tokenizer that prepends <s> (BOS) like Llama's, with </s> as EOS and <pad>."""
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _seqs(lengths, first_id=100):
    """Sequences with globally unique ids (so a batch's tokens tell which sequence they came from)."""
    out, nxt = [], first_id
    for n in lengths:
        ids = np.arange(nxt, nxt + n, dtype=np.int32)
        nxt += n
        out.append((ids, np.ones(n, np.int32)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_completion_mask_exact(tiny_tok):
    ids, mask = tokenize_example({"prompt": "Q : what is two plus two", "completion": "A : four"}, tiny_tok)
    w = {t: i for i, t in enumerate(_WORDS)}
    expected = [w["<s>"], w["Q"], w[":"], w["what"], w["is"], w["two"], w["plus"], w["two"], w["A"], w[":"],
                w["four"], w["</s>"]]
    assert ids.tolist() == expected
    assert mask.tolist() == [0] * 8 + [1] * 4


def test_text_all_targets_with_bos_and_eos(tiny_tok):
    ids, mask = tokenize_example(Example("text", {"text": "the cat sat"}), tiny_tok)
    assert tiny_tok.decode(ids) == "<s> the cat sat </s>"
    assert mask.tolist() == [1] * 5


def test_chat_mask_smollm2(smol_tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "More please"}, {"role": "assistant", "content": "Sure \n\n thing!"}]
    ids, mask = tokenize_example({"messages": messages}, smol_tok)
    assert ids.tolist() == smol_tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    # Contiguous target spans decode to exactly each assistant message plus its end-of-turn token.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    spans = [smol_tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
    assert spans == ["Hello there<|im_end|>", "Sure \n\n thing!<|im_end|>"]
    rest = smol_tok.decode(ids[mask == 0])
    assert "Hi" in rest and "More please" in rest and "<|im_start|>assistant\n" in rest
    assert "Hello" not in rest


def test_chat_system_first_and_template_errors(smol_tok, tiny_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Ok"}]
    ids, mask = tokenize_example({"messages": messages}, smol_tok)
    assert smol_tok.decode(ids[mask == 1]) == "Ok<|im_end|>"
    with pytest.raises(ValueError, match=r"example 0: the chat template failed.*no chat template"):
        Batches.from_examples([{"messages": messages}], tiny_tok, seq_len=8, batch_size=1)


# ---------------------------------------------------------------------------------------------------------------
# Loading and its errors
# ---------------------------------------------------------------------------------------------------------------


def test_load_formats(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n  \n\nsecond doc\n", encoding="utf-8")
    ex = load_examples(txt)
    assert [(e.kind, e.data["text"], e.source) for e in ex] == [
        ("text", "first doc\nline two", f"{txt}:1"), ("text", "second doc", f"{txt}:6")]
    assert load_examples(txt, txt_split="file")[0].data["text"] == txt.read_text()

    jl = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "p", "completion": "c", "id": 7}), "",
                                       json.dumps({"prompt": "q", "completion": "d"})])
    ex = load_examples(jl)
    assert [e.data for e in ex] == [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]
    assert ex[1].kind == "completion" and ex[1].source == f"{jl}:3"

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ex = load_examples(_write(tmp_path / "c.jsonl", [json.dumps({"messages": chat})]))
    assert ex[0].kind == "chat" and ex[0].data["messages"] == chat


@pytest.mark.parametrize("lines, message", [
    (["{\"text\": \"ok\"}", "{\"text\": oops}"], r"bad\.jsonl:2: invalid JSON"),
    (["{\"text\": \"ok\"}", "", "{\"question\": \"x\"}"], r"bad\.jsonl:3: keys \['question'\] match no format"),
    (["{\"text\": \"ok\"}", "{\"prompt\": \"p\", \"completion\": \"c\"}"],
     r"bad\.jsonl:2: mixed dataset formats.*'completion'.*bad\.jsonl:1 is 'text'"),
    (["{\"text\": \"t\", \"prompt\": \"p\", \"completion\": \"c\"}"], r"bad\.jsonl:1: .*more than one format"),
    (["{\"text\": 3}"], r"bad\.jsonl:1: 'text' must be a string"),
    (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
    (["{\"messages\": [{\"role\": \"user\"}]}"], r"bad\.jsonl:1: messages\[0\] must be an object"),
    (["{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"], r"bad\.jsonl:1: .*no 'assistant' message"),
    (["{\"messages\": [{\"role\": \"assistant\", \"content\": \"hi\"}]}"], r"bad\.jsonl:1: .*starts with an assist"),
    (["", "   "], r"bad\.jsonl: empty dataset"),
])
def test_load_errors(tmp_path, lines, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_examples(path)


def test_load_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: dataset file not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported dataset file type"):
        load_examples(tmp_path / "x.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: empty dataset"):
        load_examples(tmp_path / "empty.txt")


# ---------------------------------------------------------------------------------------------------------------
# Rows: padding, packing, overflow
# ---------------------------------------------------------------------------------------------------------------


def test_padding_rows(tiny_tok):
    exs = [{"prompt": "Q : what is two plus two", "completion": "A : four"}, {"text": "the cat sat"}]
    b = Batches.from_examples(exs, tiny_tok, seq_len=15, batch_size=2, pack=False, shuffle=False)
    assert (b.num_rows, b.steps_per_epoch, b.pad_id) == (2, 1, 0)
    batch = b.batch_at(0)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 16) for k in ("input_ids", "loss_mask", "attention_mask")}
    assert all(v.dtype == np.int32 for v in batch.values())
    ids0, m0 = tokenize_example(exs[0], tiny_tok)
    assert batch["input_ids"][0].tolist() == ids0.tolist() + [0] * 4
    assert batch["loss_mask"][0].tolist() == m0.tolist() + [0] * 4
    assert batch["attention_mask"][0].tolist() == [1] * 12 + [0] * 4
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 11
    assert batch["loss_mask"][1].tolist() == [1] * 5 + [0] * 11


def test_packing_rows_keep_each_examples_targets(tiny_tok):
    exs = [{"prompt": "Q : what is two plus two", "completion": "A : four"}, {"text": "the cat sat"},
           {"prompt": "Q :", "completion": "hello world"}]
    toks = [tokenize_example(e, tiny_tok) for e in exs]  # lengths 12, 5, 6
    b = Batches.from_examples(exs, tiny_tok, seq_len=17, batch_size=1, pack=True, shuffle=False)
    assert b.num_rows == 2  # [12 + 5] fills the first row exactly, [6] goes to the second
    rows = [b.batch_at(k) for k in range(2)]
    assert rows[0]["input_ids"][0].tolist() == toks[0][0].tolist() + toks[1][0].tolist() + [0]
    assert rows[0]["loss_mask"][0].tolist() == toks[0][1].tolist() + toks[1][1].tolist() + [0]
    assert rows[0]["attention_mask"][0].tolist() == [1] * 17 + [0]
    assert rows[1]["loss_mask"][0].tolist() == toks[2][1].tolist() + [0] * 12
    assert rows[1]["attention_mask"][0].sum() == 6


def test_packing_fills_rows():
    b = Batches(_seqs([3, 7, 5, 5, 2, 8, 4, 6]), seq_len=9, batch_size=1, seed=3)  # 40 tokens, rows of 10
    assert b.num_rows <= 5
    seen = np.concatenate([b.batch_at(k)["input_ids"][0] for k in range(b.num_rows)])
    assert sorted(seen[seen >= 100].tolist()) == list(range(100, 140))


def test_overflow_truncate_warns_error_raises_split_covers():
    seqs = _seqs([4, 12, 9])
    with pytest.warns(UserWarning, match=r"2 of 3 examples are longer than seq_len \+ 1 = 8 tokens and were "
                                         r"truncated \(first: a.jsonl:2\)"):
        b = Batches(seqs, seq_len=7, batch_size=3, pack=False, shuffle=False,
                    sources=["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"])
    assert b.batch_at(0)["input_ids"][1].tolist() == list(range(104, 112))
    with pytest.raises(ValueError, match=r"a.jsonl:2 \(example 1\): 12 tokens, longer than seq_len \+ 1 = 8"):
        Batches(seqs, seq_len=7, batch_size=1, overflow="error", sources=["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Batches(seqs, seq_len=11, batch_size=1, overflow="error")  # fits: no warning, no error
        b = Batches(seqs, seq_len=7, batch_size=1, overflow="split", pack=False, shuffle=False)
    # 12 tokens -> [0:8] and [7:12]; the repeated token 7 is a target only once.
    assert b.num_sequences == 5
    rows = [b.batch_at(k) for k in range(b.num_rows)]
    targets = [int(t) for r in rows for t, m in zip(r["input_ids"][0][1:], r["loss_mask"][0][1:]) if m]
    assert sorted(targets) == sorted(set(range(101, 104)) | set(range(105, 116)) | set(range(117, 125)))


def test_examples_without_targets_are_dropped(tiny_tok):
    exs = [{"prompt": "Q : what is two plus two", "completion": "four"}, {"text": "the cat"}]
    with pytest.warns(UserWarning) as record:
        b = Batches.from_examples(exs, tiny_tok, seq_len=4, batch_size=1)
    assert [str(r.message).split(" (")[0] for r in record] == [
        "1 of 2 examples are longer than seq_len + 1 = 5 tokens and were truncated",
        "1 of 2 examples have no target token"]
    assert b.num_sequences == 1


# ---------------------------------------------------------------------------------------------------------------
# Determinism, epochs, resumption, accumulation, hosts
# ---------------------------------------------------------------------------------------------------------------


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_determinism_and_resume():
    seqs = _seqs([3, 5, 2, 6, 4, 4, 7, 2, 3, 5, 6, 2])
    kw = dict(seq_len=7, batch_size=2, seed=5, pack=False)
    a, b = Batches(seqs, **kw), Batches(seqs, **kw)
    assert a.fingerprint == b.fingerprint
    straight = [batch for _, batch in a.iterate(0, 3 * a.steps_per_epoch)]
    resumed = [batch for _, batch in b.iterate(7, 3 * a.steps_per_epoch - 7)]
    assert all(_same(x, y) for x, y in zip(straight[7:], resumed))
    assert _same(Batches(seqs, **kw).batch_at(9), straight[9])  # random access equals iteration
    other = Batches(seqs, **{**kw, "seed": 6})
    assert other.fingerprint != a.fingerprint
    # the host split is not part of the data's identity (a run may resume with another process count)
    assert Batches(seqs, **kw, host_index=1, host_count=2).fingerprint == a.fingerprint
    assert not all(_same(x, other.batch_at(k)) for k, x in enumerate(straight))
    # Epochs are different permutations.
    assert a.row_indices(0).tolist() != a.row_indices(a.steps_per_epoch).tolist()


@pytest.mark.parametrize("pack", [False, True])
def test_every_example_once_per_epoch(pack):
    lengths = [3, 5, 2, 6, 4, 4, 7, 2, 3, 5, 6]
    b = Batches(_seqs(lengths), seq_len=7, batch_size=3, seed=1, pack=pack, drop_remainder=False)
    for epoch in range(2):
        toks = np.concatenate([b.batch_at(epoch * b.steps_per_epoch + k)["input_ids"].ravel()
                               for k in range(b.steps_per_epoch)])
        assert sorted(toks[toks >= 100].tolist()) == list(range(100, 100 + sum(lengths)))
    if not pack:  # 11 rows in batches of 3: the last batch holds 2 real rows and 1 empty one
        assert b.steps_per_epoch == 4
        last = b.batch_at(3)
        assert last["attention_mask"].sum(1).tolist().count(0) == 1 and last["loss_mask"][2].sum() == 0
    dropped = Batches(_seqs(lengths), seq_len=7, batch_size=3, pack=False)
    assert dropped.steps_per_epoch == 3


def test_accumulation_and_host_slices():
    seqs = _seqs([4] * 16)
    full = Batches(seqs, seq_len=5, batch_size=4, accum_steps=2, seed=2, pack=False)
    assert full.steps_per_epoch == 2
    g = full.batch_at(3)
    assert g["input_ids"].shape == (2, 4, 6)
    parts = [Batches(seqs, seq_len=5, batch_size=4, accum_steps=2, seed=2, pack=False, host_index=h,
                     host_count=2).batch_at(3) for h in range(2)]
    assert parts[0]["input_ids"].shape == (2, 2, 6)
    for k in g:
        assert np.array_equal(np.concatenate([p[k] for p in parts], axis=1), g[k])
    with pytest.raises(ValueError, match="not divisible by host_count"):
        Batches(seqs, seq_len=5, batch_size=3, host_count=2)
    with pytest.raises(ValueError, match=r"2 row\(s\) are fewer than one step's accum_steps \* batch_size = 8"):
        Batches(_seqs([4, 4]), seq_len=5, batch_size=4, accum_steps=2)


def test_split_deterministic(tiny_tok, tmp_path):
    items = list(range(20))
    tr, ev = split_examples(items, 0.25, seed=0)
    assert (tr, ev) == split_examples(items, 0.25, seed=0)
    assert len(ev) == 5 and sorted(tr + ev) == items and tr == sorted(tr)
    assert split_examples(items, 0.25, seed=1)[1] != ev
    assert split_examples(items, 0.0) == (items, [])
    with pytest.raises(ValueError, match="too few"):
        split_examples([1], 0.5)

    path = _write(tmp_path / "d.jsonl", [json.dumps({"text": "the cat sat"})] * 10)
    train, held_out = make_batches(path, tiny_tok, seq_len=7, batch_size=2, eval_fraction=0.2, pack=False)
    assert (train.num_rows, held_out.num_rows, held_out.steps_per_epoch) == (8, 2, 1)
    assert make_batches(path, tiny_tok, seq_len=7, batch_size=2)[1] is None
