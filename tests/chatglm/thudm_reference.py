"""Reference side of the ChatGLM parity tests: run THUDM's own remote code, record what it does.

Run ONLY with the reference venv's python (torch 2.13.0, transformers 4.33.3, sentencepiece,
protobuf, numpy<2; see tests/chatglm/conftest.py), never with chattune's:

    python thudm_reference.py FAMILY_DIR OUT_DIR

FAMILY_DIR is one of ../shared/fixtures/chatglm/{chatglm-6b,chatglm2-6b,chatglm3-6b}. The script
copies it to a temporary folder (nothing is written next to the fixture, nor to the home folder:
HF_HOME and HF_MODULES_CACHE point into that temporary folder, and the hub is offline), builds the
tiny model from its config with random weights (torch.manual_seed(0)), and writes

    OUT_DIR/model/          the model as a user downloads it from the Hub: the fixture's
                            config.json, weights written by save_pretrained, tokenizer model,
                            tokenizer_config.json and THUDM's remote .py files
    OUT_DIR/reference.json  special token ids, encode/decode of tests/chatglm/texts.json, the chat
                            prompt ids THUDM's code builds, greedy generations and model.chat()
    OUT_DIR/logits.pt       torch.save'd list of float32 tensors [seq, vocab], one per
                            reference.json["logits"] entry

For chatglm-6b, reference.json also holds "replies": answer ids (the encoded REPLY_TEXTS and
random sequences of REPLY_POOL_TEXTS' pieces) with the text chat() makes of them:
``tokenizer.decode(ids)``, then ``model.process_response``.

A THUDM call that raises is recorded (``"error"`` field and the top-level ``"errors"`` list); the
script still writes everything else and exits 0. It exits non-zero only when it cannot build or
save the model at all. This file must not import chattune.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXTS_FILE = HERE / "texts.json"

FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")

SPECIAL_TOKENS = {
    "chatglm-6b": ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>",
                   "<pad>", "<unk>", "</s>", "<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>"],
    "chatglm2-6b": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<unk>", "<s>", "</s>"],
    "chatglm3-6b": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<unk>", "<s>", "</s>",
                    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
}

# (name, query, [[user, assistant], ...], system or None); the system case is chatglm3 only. The
# queries were picked among a few natural candidates so that every greedy step of every family has
# a top-1/top-2 logit gap of at least 7e-3 and no generated id lies in the padded part of the
# vocabulary (THUDM's chatglm2 tokenizer raises on those); see "min_gap" in reference.json.
PROMPT_CASES = [
    ("zh_no_history", "你是谁？", [], None),
    ("en_no_history", "Hello!", [], None),
    ("zh_one_turn", "谢谢！", [["你好", "你好！我是人工智能助手 ChatGLM，很高兴见到你。"]], None),
    ("en_two_turns", "What about 3+3?", [["Hi", "Hello! How can I help you today?"],
                                         ["What is 2+2?", "2+2 = 4."]], None),
    ("zh_system", "介绍一下你自己", [], "You are ChatGLM3, a helpful assistant. 请用中文回答。"),
]

# chatglm3 tool calling: conversations in chattune's canonical schema (plain dicts; this file does
# not import chattune), turned here into THUDM's own inputs. "prompt" cases end with a tool result:
# build_chat_input(result, history, role="observation"), as THUDM's tool demos continue after a call.
# The "train" case goes through THUDM's finetune_chatmodel_demo format_conversation (below).
TOOLS = [{"name": "get_weather", "description": "查询城市的天气 (current weather of a city)",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
TOOL_CASES = [
    ("tool_prompt", [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": '{"temperature": 21}', "name": "get_weather"},
    ]),
    ("tool_prompt_text_first", [
        {"role": "user", "content": "北京今天天气怎么样？"},
        {"role": "assistant", "content": "好的，我来查一下。",
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京", "days": 1}}]},
        {"role": "tool", "content": '{"temperature": 22}', "name": "get_weather"},
    ]),
    ("tool_train", [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": '{"temperature": 21}', "name": "get_weather"},
        {"role": "assistant", "content": "It is 21 degrees Celsius in Paris."},
    ]),
]
# THUDM/ChatGLM3 finetune_chatmodel_demo/preprocess_utils.py @174470a3 (PROMPT.md's tool example too)
FUNCTION_CALL_NAME = "tool_call"
FUNCTION_CALL_PREFIX = "```python\n"
FUNCTION_CALL_POSTFIX = "\n```"
TOOL_DEFINITION_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"

MIXED_TEXT = ("Hello 世界! def f(x):\n    return x  # 注释，返回 x\n\t3.14 ✓ 你好吗？"
              " The quick brown fox 跳过了懒狗。")
NEW_TOKENS = 12
SEED = 0
STD = 0.1
# chatglm-6b scales the residual branch (alpha = sqrt(2 * num_layers) times the layer-normed input)
# and ties lm_head to the word embeddings, so with N(0, 0.1) inside the layers its greedy output
# only ever repeats the last input token (<sop> x 12): a test of nothing. N(0, 0.5) for its
# attention/MLP matrices gives varied tokens. Vocab-sized matrices keep STD in every family.
LAYER_MATRIX_STD = {"chatglm-6b": 0.5, "chatglm2-6b": STD, "chatglm3-6b": STD}
TOP_K = 5

# chatglm-6b replies: what chat() turns answer ids into (decode, then process_response). Mixed
# Chinese / ASCII punctuation (which process_response writes full width next to Chinese), spaces
# before punctuation (which the decode cleans up), newlines, tabs, runs of spaces, the marker.
REPLY_TEXTS = [
    "你好,我是助手!", "你好，我是助手！", "Hello , world ! How are you ?",
    "我是ChatGLM-6B,一个语言模型:可以回答问题;你呢?", "  前后有空格 , 好 ! ",
    "第一行,\n第二行!\n\n第三行:内容;结束?", "[[训练时间]],我被训练。", "我的训练时间是[[训练时间]]!",
    "a,b!c:d;e?f", "中,a a,中 中,中 ,中 中, ,,中", "I 'm here , you 're there . don 't ! it 's ' ok ' ? we 've",
    "价格: 3.14 , 数量 : 2", "代码:\n    x = 1 ,  y = 2\n\t结束!", "!?:;,开头", "结尾,!?:;", "[[训练时间",
    "“引号”,（括号）!", "한국어,日本語!русский?", "emoji 👍,好!", "中 . 中 ? 中 ! 中 ' 中", "   ", "",
]
REPLY_POOL_TEXTS = ["你", "好", "中国", "世界", "模型", ",", "!", ":", ";", "?", ".", "'", "s", "m", "re", "ve",
                    "n't", "n", "t", "a", "Hello", "world", "I", "\n", "  ", "\t", "[[", "训练", "时间", "]]",
                    "[[训练时间]]", "2023", "年", "，", "。", "ok", "x 'm", "a ,", "b .", "c !", "d ?"]
REPLY_SEQUENCES = 300
REPLY_MAX_LENGTH = 24


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}"


class Recorder:
    def __init__(self) -> None:
        self.errors: list[dict] = []

    def call(self, where: str, fn, *args, **kwargs):
        """(result, None) or (None, error string); errors are also collected in self.errors."""
        try:
            return fn(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - a failing THUDM call is a result, not a crash
            msg = _err(exc)
            tb = traceback.extract_tb(exc.__traceback__)
            self.errors.append({"where": where, "error": msg,
                                "traceback_tail": [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                   for f in tb[-6:]]})
            return None, msg


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def init_weights(model, torch, round_fp16: set[str], layer_matrix_std: float) -> dict:
    """Every parameter, deterministically (torch.manual_seed(SEED), named_parameters() order):
    embeddings / output matrices N(0, STD), other matrices N(0, layer_matrix_std), norm weights
    1 + N(0, STD), every bias N(0, STD). Parameters in ``round_fp16`` (chatglm-6b: the ones THUDM's
    code builds in float16) are rounded to float16 values, so that re-loading the checkpoint with
    THUDM's code (which builds them in float16 again) gives bit-identical weights."""
    torch.manual_seed(SEED)
    kinds = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters come once
            if p.dim() >= 2:
                vocab_sized = p.shape[0] in (getattr(model.config, "vocab_size", -1),
                                             getattr(model.config, "padded_vocab_size", -1))
                std = STD if vocab_sized else layer_matrix_std
                kind = f"matrix N(0,{std})"
                p.copy_(torch.randn(p.shape, dtype=torch.float32) * std)
            elif name.endswith("bias"):
                kind = f"bias N(0,{STD})"
                p.copy_(torch.randn(p.shape, dtype=torch.float32) * STD)
            elif "norm" in name.lower() and name.endswith("weight"):
                kind = f"norm weight 1+N(0,{STD})"
                p.copy_(1.0 + torch.randn(p.shape, dtype=torch.float32) * STD)
            else:
                raise RuntimeError(f"no init rule for parameter {name} {tuple(p.shape)}")
            if name in round_fp16:
                p.copy_(p.half().float())
                kind += ", rounded to float16"
            kinds[name] = kind
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"{name} not finite after init")
    return kinds


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    family_dir = Path(argv[0]).resolve()
    out_dir = Path(argv[1]).resolve()
    family = family_dir.name
    if family not in FAMILIES:
        print(f"unknown family folder {family_dir} (expected one of {FAMILIES})", file=sys.stderr)
        return 2

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix=f"thudm-ref-{family}-"))
    # before transformers is imported: it reads these at import time
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(work / "hf-home")
    os.environ["HF_MODULES_CACHE"] = str(work / "hf-modules")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        return run(family, family_dir, out_dir, work, t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(family: str, family_dir: Path, out_dir: Path, work: Path, t_start: float) -> int:
    import warnings

    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    timings: dict[str, float] = {}
    t0 = time.time()
    timings["import"] = round(t0 - t_start, 3)

    rec = Recorder()
    src = work / family
    shutil.copytree(family_dir, src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in src.iterdir():  # the fixture files are read-only; transformers copies them around
        f.chmod(0o644)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)

    texts = json.loads(TEXTS_FILE.read_text(encoding="utf-8"))
    is_v1 = family == "chatglm-6b"
    is_v3 = family == "chatglm3-6b"
    auto_cls = AutoModel if is_v1 else AutoModelForCausalLM

    # ------------------------------------------------------------------ tokenizer
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=True)
    timings["tokenizer_load"] = round(time.time() - t0, 3)

    special_tokens, special_via, special_back = {}, {}, {}
    for token in SPECIAL_TOKENS[family]:
        if not is_v1 and token in tok.tokenizer.special_tokens:  # chatglm2/3: their own table
            via, (tid, err) = "get_command", rec.call(f"get_command({token})", tok.get_command, token)
        else:
            via, (tid, err) = "convert_tokens_to_ids", rec.call(
                f"convert_tokens_to_ids({token})", tok.convert_tokens_to_ids, token)
        special_tokens[token] = tid if err is None else f"ERROR {err}"
        special_via[token] = via
        if err is None:
            back, err2 = rec.call(f"convert_ids_to_tokens({tid})", tok.convert_ids_to_tokens, tid)
            special_back[token] = back if err2 is None else f"ERROR {err2}"

    attrs = {}
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "gmask_token", "end_token",
                 "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side",
                 "vocab_size", "model_input_names"):
        try:  # chatglm2/3 have no gmask_token / end_token: not a failure, just absent
            attrs[attr] = _jsonable(getattr(tok, attr))
        except AttributeError:
            pass
    attrs["len"] = len(tok)
    attrs["class"] = type(tok).__name__

    encode, decode = [], []
    for text in texts:
        ids, err = rec.call(f"encode({text!r}, add_special_tokens=False)", tok.encode, text,
                            add_special_tokens=False)
        ids_sp, err_sp = rec.call(f"encode({text!r})", tok.encode, text)
        toks, err_t = rec.call(f"tokenize({text!r})", tok.tokenize, text)
        entry = {"text": text, "ids": ids, "ids_with_specials": ids_sp, "tokens": toks}
        if err or err_sp or err_t:
            entry["error"] = "; ".join(e for e in (err, err_sp, err_t) if e)
        encode.append(entry)
        d_entry = {"text": text, "ids": ids, "decoded": None, "decoded_with_specials": None}
        if ids is not None:
            out, err = rec.call(f"decode(ids of {text!r})", tok.decode, ids)
            d_entry["decoded"] = out
            if err:
                d_entry["error"] = err
        if ids_sp is not None:
            out, err = rec.call(f"decode(ids_with_specials of {text!r})", tok.decode, ids_sp)
            d_entry["decoded_with_specials"] = out
            if err:
                d_entry["error"] = (d_entry.get("error", "") + "; " + err).strip("; ")
        decode.append(d_entry)
    timings["tokenizer_texts"] = round(time.time() - t0 - timings["tokenizer_load"], 3)

    # ------------------------------------------------------------------ model
    t1 = time.time()
    config = AutoConfig.from_pretrained(str(src), trust_remote_code=True)
    model = auto_cls.from_config(config, trust_remote_code=True)
    built_dtypes = {n: str(p.dtype).replace("torch.", "") for n, p in model.named_parameters()}
    tied = False
    if is_v1:
        # transformers 4.33's from_pretrained ties lm_head to the word embeddings (config
        # tie_word_embeddings defaults to True and the remote class exposes both), from_config does
        # not: tie here so that this model equals what a user gets from the saved folder.
        model.tie_weights()
        tied = model.lm_head.weight is model.transformer.word_embeddings.weight
        model = model.float()  # THUDM's README on CPU; params_dtype is hard-coded to half
    round_fp16 = {n for n, d in built_dtypes.items() if d == "float16"}
    kinds = init_weights(model, torch, round_fp16, LAYER_MATRIX_STD[family])
    model.eval()
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError("model is not float32")
    timings["model_build_init"] = round(time.time() - t1, 3)

    # ------------------------------------------------------------------ save like the Hub folder
    t1 = time.time()
    if family == "chatglm-6b":
        save_kw = {"safe_serialization": False, "max_shard_size": "20MB"}
    elif family == "chatglm2-6b":
        save_kw = {"safe_serialization": False}
    else:
        save_kw = {"safe_serialization": True, "max_shard_size": "10MB"}
    state_dict = None
    if tied:
        # save_pretrained (4.33) keeps only one name of two tensors sharing storage (here only
        # lm_head.weight); write both names, equal values, so that a loader finds either
        state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(str(model_dir), state_dict=state_dict, **save_kw)
    saved_by_save_pretrained = sorted(os.listdir(model_dir))
    # the official repos ship their own config.json and no generation_config.json
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.suffix in (".py", ".model", ".json")):
            dest = model_dir / f.name
            dest.unlink(missing_ok=True)  # save_pretrained copied some .py with the fixture's read-only mode
            shutil.copyfile(f, dest)
            copied.append(f.name)
    timings["save"] = round(time.time() - t1, 3)

    # ------------------------------------------------------------------ prompts
    t1 = time.time()
    prompts = []
    for name, query, history, system in PROMPT_CASES:
        if system is not None and not is_v3:
            continue
        case = {"name": name, "query": query, "history": history, "system": system}
        if is_v1:
            # verbatim from ChatGLMForConditionalGeneration.chat (modeling_chatglm.py; no helper)
            hist = [tuple(h) for h in history]
            if not hist:
                prompt = query
            else:
                prompt = ""
                for i, (old_query, response) in enumerate(hist):
                    prompt += "[Round {}]\n问：{}\n答：{}\n".format(i, old_query, response)  # noqa: UP032
                prompt += "[Round {}]\n问：{}\n答：".format(len(hist), query)  # noqa: UP032
            case["how"] = "prompt string as in model.chat(); tokenizer([prompt])['input_ids'][0]"
            case["prompt_text"] = prompt
            ids, err = rec.call(f"prompt {name}", lambda p=prompt: tok([p])["input_ids"][0])
        elif not is_v3:
            hist = [tuple(h) for h in history]
            case["how"] = "model.build_inputs(tokenizer, query, history) (= tokenizer([tokenizer.build_prompt(query, history)]))"
            case["prompt_text"], _ = rec.call(f"build_prompt {name}", tok.build_prompt, query, history=hist)
            ids, err = rec.call(f"build_inputs {name}",
                                lambda q=query, h=hist: model.build_inputs(tok, q, history=h)["input_ids"][0].tolist())
        else:
            hist = ([{"role": "system", "content": system}] if system is not None else [])
            for user, assistant in history:
                hist += [{"role": "user", "content": user},
                         {"role": "assistant", "metadata": "", "content": assistant}]
            case["how"] = "tokenizer.build_chat_input(query, history=history, role='user')['input_ids'][0]"
            case["prompt_text"] = None
            case["chatglm3_history"] = hist
            ids, err = rec.call(f"build_chat_input {name}",
                                lambda q=query, h=hist: tok.build_chat_input(q, history=copy.deepcopy(h),
                                                                             role="user")["input_ids"][0].tolist())
        case["ids"] = ids
        if err:
            case["error"] = err
        elif ids is not None:
            case["decoded"], _ = rec.call(f"decode prompt {name}", tok.decode, ids)
        prompts.append(case)
    tool_prompts = []
    if is_v3:
        for name, messages in TOOL_CASES:
            case = {"name": name, "tools": TOOLS, "messages": messages}
            if name.endswith("_train"):
                case["how"] = ("finetune_chatmodel_demo format_conversation (astunparse -> ast.unparse) and "
                               "MultiTurnDataset's labels, untruncated")
                res, err = rec.call(f"format_conversation {name}", _finetune_tokens_and_labels, tok, messages)
                if res:
                    case["ids"], case["labels"] = res
            else:
                history, query = _chatglm3_tool_history(messages)
                case["how"] = "tokenizer.build_chat_input(result, history=history, role='observation')"
                case["chatglm3_history"] = history
                ids, err = rec.call(f"build_chat_input {name}",
                                    lambda q=query, h=history: tok.build_chat_input(
                                        q, history=copy.deepcopy(h), role="observation")["input_ids"][0].tolist())
                case["ids"] = ids
            if err:
                case["error"] = err
            tool_prompts.append(case)
    timings["prompts"] = round(time.time() - t1, 3)

    # ------------------------------------------------------------------ logits
    t1 = time.time()
    one = tok.encode("hello", add_special_tokens=False)
    mixed = tok.encode(MIXED_TEXT, add_special_tokens=False)
    if len(mixed) < 18:
        raise RuntimeError(f"MIXED_TEXT gives only {len(mixed)} tokens")
    if is_v1:  # the model needs [gMASK] and <sop> (it raises without <sop>)
        one_ids = tok.build_inputs_with_special_tokens(one[:1])
        one_note = "1 text token + build_inputs_with_special_tokens ([gMASK] <sop> after it): 3 ids"
    else:
        one_ids = one[:1]
        one_note = "exactly 1 token, no special tokens"
    mixed_ids = tok.build_inputs_with_special_tokens(mixed[:18])
    logit_inputs = [("prompt", prompts[0]["ids"], f"ids of prompt case {prompts[0]['name']}"),
                    ("one_token", one_ids, one_note),
                    ("mixed_20", mixed_ids, "first 18 ids of encode(MIXED_TEXT, add_special_tokens=False) "
                                            "+ build_inputs_with_special_tokens: 20 ids")]
    logits_meta, logits_tensors = [], []
    for name, ids, note in logit_inputs:
        entry = {"name": name, "input_ids": ids, "note": note}
        out, err = rec.call(f"forward {name}", _forward_logits, model, torch, ids)
        if err:
            entry["error"] = err
            out = torch.empty(0)
        entry["shape"] = list(out.shape)
        logits_meta.append(entry)
        logits_tensors.append(out)
    torch.save(logits_tensors, str(out_dir / "logits.pt"))
    timings["logits"] = round(time.time() - t1, 3)

    # ------------------------------------------------------------------ greedy + chat
    t1 = time.time()
    greedy = []
    for case in prompts:
        g = {"name": case["name"], "input_ids": case["ids"], "max_new_tokens": NEW_TOKENS}
        if case["ids"] is None:
            g["error"] = "no prompt ids"
            greedy.append(g)
            continue
        res, err = rec.call(f"generate {case['name']}", _greedy, model, torch, case["ids"])
        if err:
            g["error"] = err
        else:
            g.update(res)
            g["decoded"], _ = rec.call(f"decode greedy {case['name']}", tok.decode, res["output_ids"])
        g["chat"] = _chat(model, tok, case, is_v1, is_v3, rec)
        greedy.append(g)
    timings["greedy_and_chat"] = round(time.time() - t1, 3)
    replies = _replies(model, tok, rec) if is_v1 else []

    # ------------------------------------------------------------------ reload check (as a user would)
    t1 = time.time()
    reload, err = rec.call("reload from OUT_DIR/model", _reload_check, auto_cls, AutoTokenizer, torch,
                           model_dir, is_v1, logit_inputs, logits_tensors, texts, encode)
    if err:
        reload = {"error": err}
    timings["reload_check"] = round(time.time() - t1, 3)
    timings["total"] = round(time.time() - t_start, 3)

    gen = model.generation_config.to_dict() if model.generation_config else {}
    generation_config = {k: gen.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_length",
                                                 "do_sample", "use_cache")}
    result = {
        "family": family,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "model_class": type(model).__name__,
        "auto_class": auto_cls.__name__,
        "init": {"seed": SEED, "std": STD, "layer_matrix_std": LAYER_MATRIX_STD[family],
                 "rule": "torch.manual_seed(seed); named_parameters() in order: vocab-sized matrices "
                 "randn*std, other matrices randn*layer_matrix_std, *bias randn*std, norm weight "
                 "1+randn*std" + ("; float16-built params rounded to float16 values, then .float()"
                                  if is_v1 else ""),
                 "kinds": kinds, "built_dtypes": built_dtypes, "lm_head_tied_to_embeddings": tied},
        "save": {"kwargs": save_kw, "state_dict_cloned": state_dict is not None,
                 "saved_by_save_pretrained": saved_by_save_pretrained,
                 "copied_from_fixture": copied, "files": sorted(os.listdir(model_dir))},
        "special_tokens": special_tokens,
        "special_tokens_via": special_via,
        "special_tokens_back": special_back,
        "tokenizer_attrs": attrs,
        "encode": encode,
        "decode": decode,
        "prompts": prompts,
        "tool_prompts": tool_prompts,
        "logits": logits_meta,
        "greedy": greedy,
        "replies": replies,
        "generation_config": _jsonable(generation_config),
        "reload": reload,
        "errors": rec.errors,
        "timings": timings,
    }
    (out_dir / "reference.json").write_text(json.dumps(_jsonable(result), ensure_ascii=False, indent=1) + "\n",
                                            encoding="utf-8")
    print(json.dumps({"family": family, "errors": len(rec.errors), "timings": timings}))
    return 0


def _function_call(function_name, parameters):
    """finetune_chatmodel_demo ``format_function_call`` (astunparse there; ast.unparse writes
    the same text for a call with constant keyword values)."""
    import ast

    keywords = [ast.keyword(arg=name, value=ast.Constant(value)) for name, value in parameters.items()]
    return ast.unparse(ast.Call(func=ast.Name(id=function_name), args=[], keywords=keywords)).strip()


def _chatglm3_tool_history(messages):
    """A canonical conversation ending with a tool result -> (build_chat_input history, result):
    the tools in a first system message (openai_api_demo / tool_using demo), a call as an
    assistant message with the function name as metadata, text before it as its own message."""
    history = [{"role": "system", "content": TOOL_DEFINITION_PREFIX.rstrip("\n"), "tools": TOOLS}]
    for m in messages[:-1]:
        if m["role"] == "assistant" and m.get("tool_calls"):
            if m["content"]:
                history.append({"role": "assistant", "metadata": "", "content": m["content"]})
            call = m["tool_calls"][0]
            code = FUNCTION_CALL_PREFIX + _function_call(FUNCTION_CALL_NAME, call["arguments"]) + FUNCTION_CALL_POSTFIX
            history.append({"role": "assistant", "metadata": call["name"], "content": code})
        elif m["role"] == "tool":
            history.append({"role": "observation", "content": m["content"]})
        else:
            history.append({"role": m["role"], "content": m["content"]})
    return history, messages[-1]["content"]


def _finetune_tokens_and_labels(tok, messages):
    """finetune_chatmodel_demo ``format_conversation`` (verbatim logic) and MultiTurnDataset's
    labels for a canonical conversation of one call and its answer."""
    item = {"tools": TOOLS, "conversations": []}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            call = m["tool_calls"][0]
            item["conversations"].append({"role": "tool", "name": call["name"], "parameters": call["arguments"]})
        elif m["role"] == "tool":
            item["conversations"][-1]["observation"] = m["content"]
        else:
            item["conversations"].append({"role": m["role"], "content": m["content"]})
    conversations = copy.deepcopy(item["conversations"])
    tokens, loss_masks = [tok.get_command("[gMASK]"), tok.get_command("sop")], [0, 0]

    def _update(_tokens, value=1):
        value = int(value)
        tokens.extend(_tokens)
        loss_masks.extend([value] * len(_tokens))

    conversations.insert(0, {"role": "system",
                             "content": TOOL_DEFINITION_PREFIX + json.dumps(item["tools"], indent=4, ensure_ascii=False)})
    for conv in conversations:
        loss = conv.get("loss", True)
        if conv["role"] in {"system", "user"}:
            loss = False
        if conv["role"] == "tool":
            value = FUNCTION_CALL_PREFIX + _function_call(FUNCTION_CALL_NAME, conv["parameters"]) + FUNCTION_CALL_POSTFIX
            _update(tok.build_single_message("assistant", conv["name"], value), loss)
            value = conv.get("observation", None)
            if not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False)
            _update(tok.build_single_message("observation", "", value), False)
        else:
            _update(tok.build_single_message(conv["role"], "", conv["content"]), loss)
    _update([tok.eos_token_id], False)
    target_based_loss_mask = [False] + loss_masks[:-1]
    labels = [(t if m else -100) for t, m in zip(tokens, target_based_loss_mask, strict=True)]
    return tokens, labels


def _forward_logits(model, torch, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0].float().contiguous()


def _greedy(model, torch, ids):
    input_ids = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids, do_sample=False, max_new_tokens=NEW_TOKENS,
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, input_ids.shape[1]:].tolist()
    gaps, top = [], []
    for step_scores in out.scores:
        values, ids = torch.topk(step_scores[0].float(), TOP_K)
        gaps.append(float(values[0] - values[1]))
        top.append([[int(i), float(v)] for i, v in zip(ids, values, strict=True)])
    eos = model.generation_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    return {"output_ids": new, "min_gap": min(gaps) if gaps else None, "gaps": gaps, "top": top,
            "eos_token_id": eos, "stopped_at_eos": bool(new) and new[-1] in eos_ids}


def _chat(model, tok, case, is_v1, is_v3, rec):
    """model.chat as a user calls it, greedy, 12 new tokens; model.generate is spied on to record the
    ids chat() feeds it and gets back."""
    max_length = len(case["ids"]) + NEW_TOKENS
    kwargs = {"do_sample": False, "max_length": max_length}
    if is_v3:
        history = copy.deepcopy(case["chatglm3_history"])  # chat() appends to the list it gets
        call = {"query": case["query"], "history": copy.deepcopy(history), "role": "user", **kwargs}
        kwargs["role"] = "user"
    else:
        history = [tuple(h) for h in case["history"]]
        call = {"query": case["query"], "history": [list(h) for h in history], **kwargs}
    spied = {}
    orig = model.generate

    def spy(*args, **kw):
        out = orig(*args, **kw)
        spied["input_ids"] = kw["input_ids"][0].tolist()
        spied["output_ids"] = out[0].tolist()[len(spied["input_ids"]):]
        spied["generate_kwargs"] = sorted(kw)
        spied["eos_token_id"] = kw.get("eos_token_id")
        return out

    model.generate = spy
    try:
        res, err = rec.call(f"chat {case['name']}", model.chat, tok, case["query"], history=history, **kwargs)
    finally:
        del model.generate
    entry = {"called_with": call, **spied}
    if "input_ids" in spied:
        entry["input_ids_equal_prompt_ids"] = spied["input_ids"] == case["ids"]
    if err:
        entry["error"] = err
    else:
        response, new_history = res
        entry["response"] = response
        entry["history"] = _jsonable(new_history)
    if is_v3:
        entry["note"] = "chatglm3 chat() drops the last generated token ([:-1]) even when it is not an eos"
    return entry


def _replies(model, tok, rec):
    """chatglm-6b: ids of answers and the text chat() makes of them (``tokenizer.decode`` then
    ``process_response``): each of REPLY_TEXTS encoded, and REPLY_SEQUENCES random sequences
    (seeded) of the pieces of REPLY_POOL_TEXTS, special tokens left out."""
    import random

    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS["chatglm-6b"][:8]}
    cases = [("text", text, tok.encode(text, add_special_tokens=False)) for text in REPLY_TEXTS]
    pool = sorted({i for text in REPLY_POOL_TEXTS for i in tok.encode(text, add_special_tokens=False)} - special)
    rng = random.Random(SEED)
    cases += [("random", None, [rng.choice(pool) for _ in range(rng.randint(1, REPLY_MAX_LENGTH))])
              for _ in range(REPLY_SEQUENCES)]
    out = []
    for kind, text, ids in cases:
        entry = {"kind": kind, "text": text, "ids": ids}
        decoded, err = rec.call(f"decode reply {ids}", tok.decode, ids)
        if err is None:
            entry["decoded"] = decoded
            entry["response"], err = rec.call(f"process_response {decoded!r}", model.process_response, decoded)
        if err:
            entry["error"] = err
        out.append(entry)
    return out


def _reload_check(auto_cls, auto_tok, torch, model_dir, is_v1, logit_inputs, logits_tensors, texts, encode):
    """Load OUT_DIR/model with THUDM's code exactly as a user would and compare."""
    m2 = auto_cls.from_pretrained(str(model_dir), trust_remote_code=True)
    loaded_dtype = str(next(m2.parameters()).dtype).replace("torch.", "")
    if is_v1:
        m2 = m2.float()
    m2.eval()
    diffs = []
    for (_, ids, _), ref in zip(logit_inputs, logits_tensors, strict=True):
        if ref.numel() == 0:
            diffs.append(None)
            continue
        got = _forward_logits(m2, torch, ids)
        diffs.append(float((got - ref).abs().max()))
    tok2 = auto_tok.from_pretrained(str(model_dir), trust_remote_code=True)
    same = all(tok2.encode(e["text"], add_special_tokens=False) == e["ids"] for e in encode if e["ids"] is not None)
    return {"loaded_dtype": loaded_dtype, "logits_max_abs_diff": diffs,
            "tokenizer_encode_identical": same,
            "tied_after_reload": (m2.lm_head.weight is m2.transformer.word_embeddings.weight) if is_v1 else None}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
