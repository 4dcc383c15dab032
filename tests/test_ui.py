"""The web UI, driven through gradio_client against a running app on loopback: generate, train the quick
preset from uploaded pictures and generate with the result, bad uploads answered in the page."""

import json
from pathlib import Path
import struct
import time
import zlib

import pytest
from conftest import serve_app


@pytest.fixture(scope="module")
def running_app(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("workspace")
    url, app = serve_app(workspace)
    yield url, workspace, app
    app.close()


@pytest.fixture(scope="module")
def client(running_app):
    from gradio_client import Client

    return Client(running_app[0], verbose=False)


def _image_path(item):
    image = item["image"]
    return image if isinstance(image, str) else image["path"]


def _generate(client, prompt, steps=6, batch=1, adapters=(), weight=1.0, model="shapes", **more):
    return client.predict(model=model, prompt=prompt, negative="", steps=steps, guidance=5.0, seed=1, batch=batch,
                          adapters=list(adapters), weight=weight, **more, api_name="/generate")


def _train(client, files, name, folder="", trigger="sks", steps=0, captions=None, trigger_token=False,
           method="lora", **method_settings):
    """The Train tab's endpoint, bound by name: what is not given keeps the page's value; a method's own
    settings are `<method>__<field>`."""
    from gradio_client import handle_file

    return client.predict(files=[handle_file(str(f)) for f in files], folder=folder, name=name, trigger=trigger,
                          method=method, preset="quick", steps=steps, trigger_token=trigger_token,
                          captions={"headers": ["image", "caption"], "data": captions or []}, **method_settings,
                          api_name="/train")


def _wait_for_job(client, until=("done", "failed"), timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, percent, previews = client.predict(api_name="/job_status")
        if any(word in status for word in until):
            return status, percent, previews
        time.sleep(1)
    raise AssertionError(f"job status stuck at {status!r}")


def test_generate_through_the_page_api(client):
    from PIL import Image

    gallery, status = _generate(client, "a large red circle on a gray background", batch=2)
    assert len(gallery) == 2 and "2 image(s)" in status
    image = Image.open(_image_path(gallery[1]))
    assert image.size == (128, 128)
    settings = json.loads(image.text["parameters"])  # the downloaded PNG says how it was made
    assert settings["prompt"] == "a large red circle on a gray background" and settings["seed"] == 2
    assert settings["steps"] == 6 and settings["adapters"] == {}


def test_bad_input_is_a_message_and_the_server_keeps_serving(client):
    with pytest.raises(Exception, match="prompt is empty"):
        _generate(client, "   ")
    with pytest.raises(Exception, match="no such model"):
        _generate(client, "a red circle", model="/nonexistent/model")
    with pytest.raises(Exception, match="'ghost'.* not in the list of choices"):
        _generate(client, "a red circle", adapters=["ghost"])
    gallery, _ = _generate(client, "a blue square", steps=4)
    assert len(gallery) == 1


def _huge_png(path, width=20000, height=20000):
    """A valid PNG header that claims 20000x20000 pixels (the pixel data never needs to exist)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def star_files(tmp_path_factory):
    from studio.bench.evaluate import write_b2_training_set

    folder = tmp_path_factory.mktemp("stars")
    images = write_b2_training_set(folder)
    return images + [p.with_suffix(".txt") for p in images]


@pytest.mark.parametrize("case,message", [
    ("text_as_png", "notes.png: not a readable image"),
    ("zero_bytes", "blank.png: empty file"),
    ("huge", "huge.png: the image is too large"),
    ("outside_folder", "must be inside the workspace"),
    ("too_few", "upload 3 to 50 images"),
])
def test_bad_uploads_are_answered_in_the_page(client, star_files, tmp_path, case, message):
    good = [f for f in star_files if f.suffix == ".png"][:3]
    if case == "text_as_png":
        (tmp_path / "notes.png").write_text("just some notes")
        reply = _train(client, good + [tmp_path / "notes.png"], "bad")
    elif case == "zero_bytes":
        (tmp_path / "blank.png").write_bytes(b"")
        reply = _train(client, good + [tmp_path / "blank.png"], "bad")
    elif case == "huge":
        reply = _train(client, good + [_huge_png(tmp_path / "huge.png")], "bad")
    elif case == "outside_folder":
        reply = _train(client, [], "bad", folder="/etc")
    else:
        reply = _train(client, good[:2], "bad")
    assert message in reply and "Traceback" not in reply
    gallery, _ = _generate(client, "a red circle", steps=3)  # still serving
    assert len(gallery) == 1


def test_captions_from_files_and_from_the_page(tmp_path, star_files):
    from studio.ui.tabs.train import stage_uploads, upload_captions

    files = [str(f) for f in star_files[:3]] + [str(star_files[8])]  # 3 images, the first one's caption file
    rows = upload_captions(files)
    assert rows[0] == ["star_0.png", star_files[8].read_text()] and rows[1] == ["star_1.png", ""]
    rows[1][1] = "a tiny sks typed in the page"
    staged = stage_uploads(files, tmp_path / "staged", rows)
    assert (staged / "star_1.txt").read_text() == "a tiny sks typed in the page"
    assert (staged / "star_0.txt").read_text() == star_files[8].read_text()
    assert not (staged / "star_2.txt").exists()  # the trigger word / instance prompt is used


def test_a_job_that_fails_shows_its_reason(client, running_app):
    bad = running_app[1] / "uploads" / "broken"
    bad.mkdir(parents=True)
    for i in range(3):
        (bad / f"{i}.png").write_text("not an image")
    assert "queued" in _train(client, [], "broken", folder="uploads/broken")
    status, _, _ = _wait_for_job(client, timeout=120)
    assert "failed" in status and "0.png: not a readable image" in status


def test_stop_keeps_a_checkpoint(client, star_files, running_app):
    assert "queued" in _train(client, star_files, "stopme", steps=2000)
    _wait_for_job(client, until=("step",), timeout=300)
    assert "stopping" in client.predict(api_name="/stop")
    status, _, _ = _wait_for_job(client, until=("stopped", "done", "failed"), timeout=120)
    assert "stopped at step" in status, status
    assert list((running_app[1] / "runs" / "stopme" / "checkpoints").iterdir())


def test_train_the_quick_preset_then_generate_with_it(client, star_files, running_app):
    from gradio_client import Client

    # the preset's settings, fewer steps: one preview; the trigger trained as a token
    reply = _train(client, star_files, "star", steps=120, trigger_token=True)
    assert "queued **star**" in reply
    status, percent, _ = _wait_for_job(client, until=("step",), timeout=300)
    assert 0 < percent < 100
    # a page opened (or reloaded) later reconnects to the running job
    other = Client(running_app[0], verbose=False)
    assert "**star**: step" in other.predict(api_name="/job_status")[0]
    # generation stays responsive while the training runs
    started = time.time()
    gallery, _ = _generate(other, "a red circle", steps=4)
    assert len(gallery) == 1 and time.time() - started < 60
    assert "step" in client.predict(api_name="/job_status")[0]  # (still training)
    status, percent, previews = _wait_for_job(client)
    assert "done" in status, status
    assert percent == 100 and previews
    table, _, _ = client.predict(api_name="/library")
    rows = table["data"] if isinstance(table, dict) else table
    assert rows[0][:3] == ["star", "lora", "shapes"]
    gallery, note = _generate(client, "a red sks on a blue background", steps=10, adapters=["star"])
    assert len(gallery) == 1 and "with star at 1" in note
    from PIL import Image

    assert json.loads(Image.open(_image_path(gallery[0])).text["parameters"])["adapters"] == {"star": 1.0}
    from studio.adapters import read_adapter

    assert "trigger_embedding" in read_adapter(running_app[1] / "adapters" / "star.safetensors").tensors
    paths, note = client.predict("star", api_name="/export_kohya")
    assert [Path(p).name for p in paths] == ["star.kohya.safetensors", "sks.safetensors"]  # the token beside it
    assert "embedding sks.safetensors" in note
    assert (running_app[1] / "exports" / "sks.safetensors").is_file()
    table, _, _, note = client.predict(name="star", new_name="star_v2", api_name="/rename")
    assert "renamed star to star_v2" in note
    with pytest.raises(Exception, match="tick 'really delete' first"):
        client.predict(name="star_v2", confirmed=False, api_name="/delete")
    table, _, _, note = client.predict(name="star_v2", confirmed=True, api_name="/delete")
    rows = table["data"] if isinstance(table, dict) else table
    assert "deleted star_v2" in note and not any(r and r[0] == "star_v2" for r in rows)


def test_erase_tab_trains_a_membrane_and_compares_before_and_after(client, running_app):
    for nothing in ("", " , "):
        assert "name what to erase" in client.predict(concepts=nothing, name="x", api_name="/erase")
    reply = client.predict(concepts="circle", name="no_circle", steps=4, api_name="/erase")
    assert "queued membrane **no_circle**" in reply, reply
    status, _, _ = _wait_for_job(client, timeout=300)
    assert "done" in status, status
    assert (running_app[1] / "adapters" / "no_circle.safetensors").is_file()
    client.predict(api_name="/membranes")  # what opening the Erase tab does: the new membrane is listed
    gallery, strengths = client.predict(model="shapes", membranes=["no_circle"], prompts="a red circle\na blue square",
                                        steps=4, guidance=5.0, seed=0, api_name="/compare_erase")
    assert len(gallery) == 4 and [g["caption"].split(":")[0] for g in gallery] == ["before"] * 2 + ["after"] * 2
    assert "a red circle: no_circle 1.00" in strengths and "a blue square: no_circle 0.00" in strengths


def test_one_step_tab_distils_an_adaptor_and_generate_uses_it(client, running_app):
    from PIL import Image

    from studio.adapters import read_adapter

    fast = {"name": "fast", "steps": 2, "pairs": 2, "seed": 0}
    assert "rank" in client.predict(**fast, rank=0, api_name="/distill")
    assert "weights must be >= 0" in client.predict(**fast, rank=2, adversarial_weight=-1, api_name="/distill")
    reply = client.predict(**fast, rank=2, adversarial_weight=0.5, api_name="/distill")
    assert "queued one-step adaptor **fast**" in reply, reply
    status, _, _ = _wait_for_job(client, timeout=300)
    assert "done" in status, status
    assert (running_app[1] / "adapters" / "fast.safetensors").is_file()
    assert read_adapter(running_app[1] / "adapters" / "fast.safetensors").metadata["adversarial_term"] == "true"
    client.predict(api_name="/one_step_adaptors")  # what opening the Generate tab does
    gallery, status = client.predict(model="shapes", prompt="a red circle", steps=25, guidance=5.0, seed=3, batch=1,
                                     one_step="fast", api_name="/generate")
    assert len(gallery) == 1 and "one step with fast" in status
    settings = json.loads(Image.open(_image_path(gallery[0])).text["parameters"])
    assert settings["steps"] == 1 and settings["guidance"] == 0.0 and settings["one_step"] == "fast"


def test_method_settings_of_another_method_are_refused_in_the_page(client, star_files):
    good = [f for f in star_files if f.suffix == ".png"][:3]
    reply = _train(client, good, "soda_bad", soda__rotate="both")  # method lora, a setting in the soda form
    assert "rotate is a setting of soda; pick the soda method" in reply and "Traceback" not in reply
    reply = _train(client, good, "oft_bad", method="soda", oft__block_size=16)
    assert "block_size is a setting of oft" in reply


def test_a_method_setting_reaches_the_config_by_name(client, running_app):
    from studio.training import config_with_preset

    bad = running_app[1] / "uploads" / "unreadable"
    bad.mkdir(parents=True)
    for i in range(3):
        (bad / f"{i}.png").write_text("not an image")
    reply = _train(client, [], "budgeted", folder="uploads/unreadable", method="sara", sara__budget="2%",
                   sara__nuclear_layers=2)
    assert "queued **budgeted**" in reply, reply
    job = running_app[2].studio_jobs.latest()
    # only what the page changed, by its field's name; the rest stays the preset's
    assert job.settings["config"]["method"] == "sara"
    assert job.settings["config"]["adapter"] == {"budget": "2%", "nuclear_layers": 2}
    config = config_with_preset(job.settings["preset"], **job.settings["config"])
    assert config.adapter["budget"] == "2%" and config.adapter["nuclear_layers"] == 2 and config.lr == 1e-3
    status, _, _ = _wait_for_job(client, timeout=120)
    assert "failed" in status


def _editor(path):
    """What the Control tab's image editor sends for an uploaded picture (nothing drawn over it)."""
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [], "composite": None}


def _disc(path, size=(128, 128)):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size)
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4), fill="white")
    image.save(path)
    return path


def _control(client, adapter, image, preprocess="none", scale=1.0, prompt="a large red circle on a gray background",
             seed=1, batch=1, steps=4, **second):
    return client.predict(model="shapes", adapter=adapter, image=image, preprocess=preprocess, scale=scale, start=0.0,
                          end=1.0, prompt=prompt, negative="", steps=steps, guidance=5.0, seed=seed, batch=batch,
                          **second, api_name="/control_generate")


def _preview(client, image, preprocess, prompt="", seed=0):
    return client.predict(image=image, preprocess=preprocess, prompt=prompt, seed=seed, api_name="/control_preview")


def _control_train(client, name, condition, steps, examples, two_shapes=0.0, start_from="", method="t2i_adapter"):
    return client.predict(name=name, method=method, condition=condition, preset="quick", steps=steps,
                          examples=examples, seed=0, two_shapes=two_shapes, overlay_scenes=False,
                          start_from=start_from, api_name="/control_train")


def test_control_tab_previews_conditions(client, tmp_path):
    import numpy as np
    from PIL import Image

    photo = Image.new("RGB", (96, 80), "gray")
    photo.paste(Image.new("RGB", (40, 30), "red"), (20, 20))
    photo.save(tmp_path / "photo.png")
    condition, note = _preview(client, _editor(tmp_path / "photo.png"), "canny", "", 0)
    canny = Image.open(condition)
    assert canny.size == (96, 80) and "condition 96x80" in note
    edges = np.asarray(canny.convert("L")) > 0
    assert edges.any() and not edges[:10].any()  # the red box's outline, nothing on the flat border
    condition, note = _preview(client, None, "mask", "a small blue square at the left on a white background", 3)
    assert Image.open(condition).size == (128, 128)


def test_control_tab_bad_input_is_a_message_and_the_server_keeps_serving(client, tmp_path):
    with pytest.raises(Exception, match="give a control image"):
        _preview(client, None, "canny", "", 0)
    with pytest.raises(Exception, match="'hed' needs an annotator with downloaded weights"):
        _preview(client, _editor(_disc(tmp_path / "disc.png")), "hed")
    with pytest.raises(Exception, match="must name a shape, a colour and a background"):
        _preview(client, None, "edges", "something nice", 0)
    with pytest.raises(Exception, match="pick a control adapter"):
        _control(client, None, _editor(tmp_path / "disc.png"))
    reply = _control_train(client, "bad", "hed", 2, 4)
    assert "downloaded weights" in reply and "Traceback" not in reply
    reply = _control_train(client, "bad", "mask", 2, 0)
    assert "examples must be at least 1" in reply
    reply = _control_train(client, "bad", "mask", 2, 4, start_from="nope")
    assert "no adapter named 'nope' in the library" in reply
    condition, _ = _preview(client, _editor(tmp_path / "disc.png"), "lineart", "", 0)
    assert condition  # still serving


def test_control_tab_trains_an_adapter_then_generates_with_it(client, running_app, tmp_path):
    import numpy as np
    from PIL import Image

    started = time.time()
    reply = _control_train(client, "disc_control", "mask", 4, 8)
    assert "queued control adapter **disc_control**" in reply, reply
    status, _, _ = _wait_for_job(client, timeout=300)
    assert "done" in status, status
    assert (running_app[1] / "adapters" / "disc_control.safetensors").is_file() and time.time() - started < 120
    table, _, _ = client.predict(api_name="/library")
    rows = table["data"] if isinstance(table, dict) else table
    assert rows[0][:3] == ["disc_control", "t2i_adapter", "shapes"]
    client.predict(api_name="/control_adapters")  # what opening the Control tab does: the new adapter is listed
    # a second stage: from the first adapter, on two-shape scenes whose two conditions are two summed inputs
    reply = _control_train(client, "scenes_control", "mask,edges", 2, 6, two_shapes=1.0, start_from="disc_control")
    assert "queued control adapter **scenes_control**" in reply, reply
    status, _, _ = _wait_for_job(client, timeout=300)
    assert "done" in status, status
    from studio.adapters import read_adapter

    library = running_app[1] / "adapters"
    assert read_adapter(library / "scenes_control.safetensors").config["init_from"] == str(
        library / "disc_control.safetensors")
    assert len(list((running_app[1] / "runs" / "scenes_control" / "data" / "conditions").glob("*.2.png"))) == 6
    disc = _editor(_disc(tmp_path / "disc.png"))
    gallery, condition, note = _control(client, "disc_control", disc, batch=2)
    assert len(gallery) == 2 and "controlled by disc_control at 1" in note
    image = Image.open(_image_path(gallery[1]))
    assert image.size == (128, 128) and Image.open(condition).size == (128, 128)
    settings = json.loads(image.text["parameters"])
    assert settings["seed"] == 2 and settings["control"][0]["adapter"] == "disc_control"
    # scale 0 is the uncontrolled model: the same image Generate makes with the same seed
    plain, _ = _generate(client, "a large red circle on a gray background", steps=4)
    off, _, _ = _control(client, "disc_control", disc, scale=0.0)
    pixels = [np.asarray(Image.open(_image_path(g[0])), dtype=int) for g in (plain, off, gallery)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    # two conditions are summed: the adapter twice at half scale is the adapter once at full scale
    halves, _, note = _control(client, "disc_control", disc, scale=0.5, adapter2="disc_control", image2=disc,
                               preprocess2="none", scale2=0.5)
    assert "disc_control at 0.5 + disc_control at 0.5" in note
    assert np.abs(np.asarray(Image.open(_image_path(halves[0])), dtype=int) - pixels[2]).max() <= 1
    # a condition rendered from the prompt, and a control image of another shape than the output is refused
    gallery, _, _ = _control(client, "disc_control", None, preprocess="mask")
    assert len(gallery) == 1
    with pytest.raises(Exception, match="aspect ratio differs"):
        _control(client, "disc_control", _editor(_disc(tmp_path / "wide.png", (128, 64))))


def test_generate_on_a_diffusion_transformer_from_the_page(client, sd3_folder):
    """The Generate tab's model field takes an SD3 folder; the pipeline's own size applies (16 px here)."""
    from PIL import Image

    gallery, status = _generate(client, "a red circle", steps=2, model=str(sd3_folder))
    assert len(gallery) == 1 and "1 image(s)" in status
    assert Image.open(_image_path(gallery[0])).size == (16, 16)
