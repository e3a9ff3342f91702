"""``icthp serve`` as the remote reward of RL trainers: the ddpo / flow_grpo / reward-server pickle protocol
(read with a restricted unpickler), the server-chosen reward and per-prompt advantages.

The clients here are written the way flow_grpo's and ddpo-pytorch's ``rewards.py`` write theirs (requests
session with urllib3 retries, ``np.array_split`` batches, JPEG bytes, ``pickle.dumps`` of a dict, POST to the
server's root URL, ``pickle.loads`` of the answer); their scores must equal ``/v1/score`` and in-process
scores of the same JPEG bytes.
"""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, httpx) is not installed")
httpx = pytest.importorskip("httpx")

from _serving import ServerThread, image_array  # noqa: E402
from icthp.registry import get_spec, score_columns  # noqa: E402
from icthp.registry import names as list_model_names  # noqa: E402
from icthp.serve import ServeConfig, create_app  # noqa: E402
from icthp.serve.app import ServedModels  # noqa: E402
from icthp.serve.pickled import safe_loads  # noqa: E402

TOKEN = "rl-token"


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")  # flow_grpo's call: default quality
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(ict_hp):
    config = ServeConfig(max_batch_size=16, max_wait_ms=5, decode_workers=2, max_images_per_request=16,
                         max_request_bytes=4 * 1024 * 1024)
    with ServerThread(create_app(config, models=ServedModels("ict-hp", ict_hp))) as s:
        yield s


def flow_grpo_style_reward(url: str, batch_size: int = 4):
    """flow_grpo's ``unifiedreward_score_remote`` body and calls, pointed at ``url`` (prompts sent too)."""
    requests = pytest.importorskip("requests")
    from requests.adapters import HTTPAdapter, Retry

    sess = requests.Session()
    retries = Retry(total=1000, backoff_factor=1, status_forcelist=[500], allowed_methods=False)
    sess.mount("http://", HTTPAdapter(max_retries=retries))

    def _fn(images, prompts, metadata):
        if isinstance(images, torch.Tensor):
            images = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        images_batched = np.array_split(images, np.ceil(len(images) / batch_size))
        prompts_batched = np.array_split(prompts, np.ceil(len(prompts) / batch_size))
        all_scores = []
        for image_batch, prompt_batch in zip(images_batched, prompts_batched, strict=True):
            jpeg_images = []
            for image in image_batch:
                img = Image.fromarray(image)
                buffer = io.BytesIO()
                img.save(buffer, format="JPEG")
                jpeg_images.append(buffer.getvalue())
            data = {"images": jpeg_images, "prompts": prompt_batch}  # prompt_batch: a numpy array of str
            data_bytes = pickle.dumps(data)
            response = sess.post(url, data=data_bytes, timeout=120)
            response_data = pickle.loads(response.content)
            all_scores += response_data["outputs"]
        return all_scores, {}

    return _fn


def test_a_flow_grpo_client_gets_the_served_ict_hp_unchanged(server, ict_hp):
    arrays = np.stack([image_array(i, 64, 80) for i in range(6)])
    prompts = ("a red fox in snow", "a glass teapot", "a red fox in snow", "‘curly’ quotes &amp; more",
               "a glass teapot", "ﬁsh in a bowl")
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    scores, info = flow_grpo_style_reward(server.url)(pixels, prompts, [{}] * 6)
    assert info == {} and len(scores) == 6 and all(type(s) is float for s in scores)
    # the same JPEG bytes, in process
    decoded = [Image.open(io.BytesIO(jpeg(a))) for a in arrays]
    expected = ict_hp.score_images_all(decoded, list(prompts))
    np.testing.assert_allclose(scores, expected.ict_hp.numpy(), atol=1e-6)
    # and through /v1/score
    files = [("images", (f"{i}.jpg", jpeg(a), "image/jpeg")) for i, a in enumerate(arrays)]
    body = httpx.post(f"{server.url}/v1/score", files=files, data={"prompts": list(prompts)}, timeout=30).json()
    np.testing.assert_allclose(scores, body["scores"]["ict_hp"], atol=1e-7)
    assert body["reward"]["name"] == "ict_hp" and body["reward"]["values"] == body["scores"]["ict_hp"]


def test_the_answer_names_its_reward_and_columns(server, ict_hp):
    arrays = [image_array(i, 48, 48) for i in range(3)]
    body = pickle.dumps({"images": [jpeg(a) for a in arrays], "prompts": ["a cat"] * 3, "meta_datas": [{}] * 3})
    r = httpx.post(server.url + "/", content=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    answer = safe_loads(r.content)  # the answer itself is plain data
    assert answer["scores"] == answer["outputs"] == answer["rewards"] == answer["columns"]["ict_hp"]
    assert set(answer["columns"]) == {"ict", "hp", "hp_logit", "ict_hp"}
    assert answer["reward"] == "ict_hp" and answer["model"] == "ict-hp" and answer["untrained"] is True
    assert answer["advantages"] is None


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_reads_the_same(server, protocol):
    arrays = [image_array(10 + i, 40, 56) for i in range(3)]
    blobs = [jpeg(a) for a in arrays]
    prompts = np.array(["a tree", "a lake", "a tree"])  # numpy strings: _reconstruct / _frombuffer per protocol
    payload = {"images": blobs, "prompts": prompts, "metadata": [{"tag": np.float32(1.5), "n": 3}] * 3,
               "only_strict": True}
    got = pickle.loads(httpx.post(server.url, content=pickle.dumps(payload, protocol=protocol), timeout=30).content)
    plain = {"images": blobs, "prompts": ["a tree", "a lake", "a tree"]}
    want = pickle.loads(httpx.post(server.url, content=pickle.dumps(plain), timeout=30).content)
    assert got["scores"] == want["scores"]


def test_safe_loads_decodes_numpy_values_without_numpy_reconstructors():
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps({"s": np.array(["ab", "cdé"]), "f": np.arange(6, dtype=np.float32).reshape(2, 3),
                             "x": np.float64(2.5), "t": (1, b"\x00\xff"), "o": np.array([{"a": 1}], dtype=object),
                             "u": np.str_("zz")}, protocol=protocol)
        out = safe_loads(data)
        assert out["s"] == ["ab", "cdé"] and out["x"] == 2.5 and out["t"] == [1, b"\x00\xff"]
        assert out["o"] == [{"a": 1}] and out["u"] == "zz"
        np.testing.assert_array_equal(out["f"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_a_ddpo_style_body_of_images_only_scores_a_prompt_free_model(tmp_path):
    import icthp

    hp = icthp.load("hp", hp="tiny-random")
    with ServerThread(create_app(ServeConfig(decode_workers=1), models=ServedModels("hp", hp))) as s:
        arrays = [image_array(20 + i, 32, 32) for i in range(2)]
        body = pickle.dumps({"images": [jpeg(a) for a in arrays], "queries": [["q?"], ["q?"]]})
        answer = pickle.loads(httpx.post(s.url, content=body, timeout=30).content)
        expected = hp.score_images_all([Image.open(io.BytesIO(jpeg(a))) for a in arrays])
        np.testing.assert_allclose(answer["scores"], expected.hp.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------- hostile bodies


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def _raw(*ops: bytes) -> bytes:
    return b"".join(ops)


def _hostile(tmp_path) -> dict[str, bytes]:
    marker = tmp_path / "pwned"
    deep = b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b"."  # 100k nested lists, built by opcodes
    shared: list = [b"a"]
    for _ in range(30):  # 2**30 leaves through shared references, 31 levels deep, a few hundred bytes
        shared = [shared, shared]
    bomb = pickle.dumps({"images": shared})
    return {
        "reduce to os.system": pickle.dumps({"images": [_System(marker)]}),
        "reduce to eval": pickle.dumps(_Eval(), protocol=0),
        "GLOBAL os system, protocol 0": b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "INST opcode": b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.",
        "STACK_GLOBAL builtins.getattr": _raw(b"\x80\x04\x8c\x08builtins\x8c\x07getattr\x93."),
        "numpy reconstruct of another class": _raw(
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncos\nsystem\nK\x00\x85C\x01b\x87R."),
        "numpy dtype of void": pickle.dumps(np.zeros(2, dtype=[("a", "i4")])),
        "numpy datetime": pickle.dumps(np.array(["2020-01-01"], dtype="datetime64[D]")),
        "codecs with another codec": b"c_codecs\nencode\n(Vx\nVrot13\ntR.",
        "copyreg reconstructor": b"ccopyreg\n_reconstructor\n(c__builtin__\nobject\ng1\nNtR.",
        "persistent id": b"\x80\x02Pabc\n.",
        "extension code": b"\x80\x02\x82\x01.",
        "truncated huge bytes": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"abc",
        "not a pickle": b"GET / HTTP/1.1\r\n",
        "nested 100k deep": deep,
        "shared-reference bomb": bomb,
        "huge bytearray claim": b"\x80\x05\x96" + struct.pack("<Q", 1 << 34) + b"abc",
        "opcode flood": b"\x80\x04" + b"N" * 1_100_000 + b".",
        "top level list": pickle.dumps([b"a"]),
        "images not bytes": pickle.dumps({"images": ["not bytes"], "prompts": ["x"]}),
        "unknown key": pickle.dumps({"images": [b"x"], "prompts": ["x"], "cmd": "rm -rf /"}),
        "set value": pickle.dumps({"images": [b"x"], "prompts": ["x"], "metadata": {1, 2}}),
        "bad advantages": pickle.dumps({"images": [b"x"], "prompts": ["x"], "advantages": "yes"}),
    }


def test_malicious_pickles_never_run_and_get_400(server, tmp_path):
    import copyreg

    copyreg.add_extension("os", "system", 1)  # EXT1 1 would resolve to os.system through find_class
    try:
        for name, body in _hostile(tmp_path).items():
            r = httpx.post(server.url, content=body, timeout=30)
            assert r.status_code == 400, (name, r.status_code, r.content[:300])
            answer = safe_loads(r.content)  # errors are pickled too: those clients pickle.loads every answer
            assert answer["code"] in ("invalid_pickle", "no_images", "invalid_image"), (name, answer)
            assert answer["error"].startswith(answer["code"] + ": ")
    finally:
        copyreg.remove_extension("os", "system", 1)
    assert not (tmp_path / "pwned").exists()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # still serving


def test_safe_loads_refuses_before_building(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os|nt)\.system"):
        safe_loads(pickle.dumps(_System(marker)))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="nested deeper"):
        safe_loads(pickle.dumps(_nested(40)))
    with pytest.raises(pickle.UnpicklingError, match="too many values"):
        x: list = [b"a"]
        for _ in range(30):
            x = [x, x]
        safe_loads(pickle.dumps(x))


def _nested(n: int) -> list:
    out: list = []
    for _ in range(n):
        out = [out]
    return out


def test_limits_apply_to_pickled_bodies(server):
    too_many = pickle.dumps({"images": [b"x"] * 17, "prompts": ["p"]})
    r = httpx.post(server.url, content=too_many, timeout=30)
    assert r.status_code == 413 and safe_loads(r.content)["code"] == "too_many_images"
    huge = pickle.dumps({"images": [b"\0" * (5 * 1024 * 1024)], "prompts": ["p"]})
    assert httpx.post(server.url, content=huge, timeout=30).status_code == 413
    corrupt = pickle.dumps({"images": [b"\xff\xd8 not a jpeg"], "prompts": ["p"]})
    r = httpx.post(server.url, content=corrupt, timeout=30)
    assert r.status_code == 400 and safe_loads(r.content)["index"] == 0
    missing_prompt = pickle.dumps({"images": [jpeg(image_array(1, 16, 16))]})
    r = httpx.post(server.url, content=missing_prompt, timeout=30)
    assert r.status_code == 400 and safe_loads(r.content)["code"] == "missing_prompt"


# ------------------------------------------------------------------------------------------- reward, advantages


def test_the_server_chooses_the_reward_and_states_it(ict_hp):
    config = ServeConfig(decode_workers=1, reward="ict_hp:1,hp:0.5", token=TOKEN)
    models = ServedModels("ict-hp", ict_hp, reward=config.reward)
    arrays = [image_array(30 + i, 40, 40) for i in range(4)]
    prompts = ["a", "a", "b", "b"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ServerThread(create_app(config, models=models)) as s:
        info = httpx.get(s.url + "/v1/models", headers=auth, timeout=10).json()["reward"]
        assert info["name"] == "ict_hp + 0.5*hp" and info["terms"] == [["ict_hp", 1.0], ["hp", 0.5]]
        assert info["advantages"] is False
        files = [("images", (f"{i}.jpg", jpeg(a), "image/jpeg")) for i, a in enumerate(arrays)]
        body = httpx.post(s.url + "/v1/score", files=files, data={"prompts": prompts}, headers=auth, timeout=30).json()
        cols = body["scores"]
        want = [a + 0.5 * b for a, b in zip(cols["ict_hp"], cols["hp"], strict=True)]
        np.testing.assert_allclose(body["reward"]["values"], want, rtol=1e-6)
        payload = pickle.dumps({"images": [jpeg(a) for a in arrays], "prompts": prompts})
        # the pickle route is behind the same token; ?token= works for clients that only hold a URL
        assert httpx.post(s.url, content=payload, timeout=30).status_code == 401
        assert httpx.post(s.url + "/?token=wrong", content=payload, timeout=30).status_code == 401
        answer = pickle.loads(httpx.post(s.url + f"/?token={TOKEN}", content=payload, timeout=30).content)
        np.testing.assert_allclose(answer["scores"], want, rtol=1e-6)
        answer = pickle.loads(httpx.post(s.url, content=payload, headers=auth, timeout=30).content)
        np.testing.assert_allclose(answer["scores"], want, rtol=1e-6)


def test_group_advantages_per_prompt(server):
    arrays = [image_array(40 + i, 40, 40) for i in range(5)]
    prompts = ["a", "b", "a", "a", "b"]
    payload = {"images": [jpeg(a) for a in arrays], "prompts": prompts, "advantages": True}
    answer = pickle.loads(httpx.post(server.url, content=pickle.dumps(payload), timeout=30).content)
    r = np.array(answer["rewards"], dtype=np.float64)
    want = np.zeros(5)
    for p in ("a", "b"):  # flow_grpo's PerPromptStatTracker on one batch, by hand
        idx = [i for i, q in enumerate(prompts) if q == p]
        want[idx] = (r[idx] - r[idx].mean()) / (r[idx].std() + 1e-4)
    np.testing.assert_allclose(answer["scores"], want, rtol=1e-9, atol=1e-9)
    assert answer["advantages"] == answer["scores"] and answer["rewards"] == answer["columns"]["ict_hp"]
    # JSON asks the same way
    body = httpx.post(server.url + "/v1/score", timeout=30, data={"prompts": prompts, "advantages": "true"},
                      files=[("images", (f"{i}.jpg", jpeg(a), "image/jpeg")) for i, a in enumerate(arrays)]).json()
    np.testing.assert_allclose(body["reward"]["advantages"], want, rtol=1e-9, atol=1e-9)


def test_server_default_advantages_and_bad_reward_names(ict_hp):
    models = ServedModels("ict-hp", ict_hp, advantages=True)
    with ServerThread(create_app(ServeConfig(decode_workers=1, advantages=True), models=models)) as s:
        arrays = [image_array(50 + i, 32, 32) for i in range(3)]
        payload = {"images": [jpeg(a) for a in arrays], "prompts": ["a"] * 3}
        answer = pickle.loads(httpx.post(s.url, content=pickle.dumps(payload), timeout=30).content)
        assert answer["advantages"] is not None and abs(sum(answer["scores"])) < 1e-6
        payload["advantages"] = False
        answer = pickle.loads(httpx.post(s.url, content=pickle.dumps(payload), timeout=30).content)
        assert answer["advantages"] is None and answer["scores"] == answer["rewards"]
    with pytest.raises(ValueError, match=r"not a served score column.*ict, hp, hp_logit, ict_hp"):
        ServedModels("ict-hp", ict_hp, reward="pickscore:1")
    with pytest.raises(ValueError, match="not a number"):
        ServeConfig(reward="ict_hp:x").validate()
    with pytest.raises(ValueError, match="pickle_path"):
        ServeConfig(pickle_path="/v1/score").validate()


def test_a_reward_naming_an_unserved_column_is_refused_at_start_up():
    # Checked with the settings, before any weights load: a typo in --reward used to surface only at /health
    # after the models loaded (minutes for CLIP-H), while the process kept running.
    with pytest.raises(ValueError, match=r"reward 'pickscore:1': 'pickscore' is not a served score column; "
                                         r"the columns are ict, hp, hp_logit, ict_hp \(serve a baseline"):
        ServeConfig(reward="pickscore:1").validate()
    with pytest.raises(ValueError, match=r"'ict' is not a served score column; the columns are hp, hp_logit"):
        ServeConfig(model="hp", reward="ict").validate()
    ServeConfig(reward="ict-hp:1,pickscore:0.5", baselines=["pickscore"]).validate()
    with pytest.raises(ValueError, match=r"model: expected one of ict, hp, ict-hp, got 'pickscore'"):
        ServeConfig(model="pickscore").validate()
    ServeConfig(model="hp", reward="hp_logit", baselines=["hpsv2.1=/somewhere"]).validate()
    with pytest.raises(ValueError, match=r"the columns are hp, hp_logit, hpsv2_1"):
        ServeConfig(model="hp", reward="hpsv2", baselines=["hpsv2.1"]).validate()


@pytest.mark.parametrize("name", list_model_names())
def test_registry_columns_are_the_scorers_columns(name):
    # The table the start-up check reads must say what the loaded scorer serves.
    from icthp import load

    kwargs = ({"weights": "tiny-random"} if get_spec(name).family == "baseline"
              else {part: "tiny-random" for part in get_spec(name).components})
    scorer = load(name, **kwargs)
    assert score_columns(name) == tuple(scorer.component_names)


def test_the_pickle_route_can_be_moved_or_turned_off(ict_hp):
    payload = pickle.dumps({"images": [jpeg(image_array(60, 32, 32))], "prompts": ["a"]})
    models = ServedModels("ict-hp", ict_hp)
    with ServerThread(create_app(ServeConfig(decode_workers=1, pickle_path="/reward"), models=models)) as s:
        assert httpx.post(s.url + "/reward", content=payload, timeout=30).status_code == 200
        assert httpx.post(s.url + "/", content=payload, timeout=30).status_code == 405
    with ServerThread(create_app(ServeConfig(decode_workers=1, pickle_path=None), models=models)) as s:
        assert httpx.post(s.url + "/", content=payload, timeout=30).status_code == 405


def test_a_verl_omni_style_body_and_its_error_key(server, ict_hp):
    """verl-omni's HTTP scorer client: {"images", "prompts", "metadata": {}} -> {"scores"}; errors carry "error"."""
    arrays = [image_array(70 + i, 40, 40) for i in range(2)]
    blobs = [jpeg(a) for a in arrays]
    payload = {"images": blobs, "prompts": ["a kite", "a kite"], "metadata": {}}
    answer = pickle.loads(httpx.post(server.url, content=pickle.dumps(payload), timeout=30).content)
    expected = ict_hp.score_images_all([Image.open(io.BytesIO(b)) for b in blobs], ["a kite"] * 2)
    np.testing.assert_allclose(answer["scores"], expected.ict_hp.numpy(), atol=1e-6)
    bad = pickle.loads(httpx.post(server.url, content=pickle.dumps({"images": [b"no"], "prompts": ["x"],
                                                                    "metadata": {}}), timeout=30).content)
    assert "scores" not in bad and bad["error"].startswith("invalid_image: images[0]")
