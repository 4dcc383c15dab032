"""The web UI, driven through gradio_client against a running app on loopback: generate, train the quick
preset from uploaded pictures and generate with the result, bad uploads answered in the page."""

import socket
import struct
import time
import zlib

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(tmp_path_factory):
    from studio.ui.app import build_app

    workspace = tmp_path_factory.mktemp("workspace")
    app = build_app("shapes", workspace).queue(default_concurrency_limit=2)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(workspace)])
    yield f"http://127.0.0.1:{port}/", workspace
    app.close()


@pytest.fixture(scope="module")
def client(running_app):
    from gradio_client import Client

    return Client(running_app[0], verbose=False)


def _image_path(item):
    image = item["image"]
    return image if isinstance(image, str) else image["path"]


def _generate(client, prompt, steps=6, batch=1, adapters=(), weight=1.0, model="shapes"):
    return client.predict(model, prompt, "", steps, 5.0, 1, batch, list(adapters), weight, api_name="/generate")


def _train(client, files, name, folder="", trigger="sks", steps=0):
    from gradio_client import handle_file

    return client.predict([handle_file(str(f)) for f in files], folder, name, trigger, "", "lora", "quick", steps, 0,
                          0, 0, 0, 0, False, api_name="/train")


def test_generate_through_the_page_api(client):
    from PIL import Image

    gallery, status = _generate(client, "a large red circle on a gray background", batch=2)
    assert len(gallery) == 2 and "2 image(s)" in status
    assert Image.open(_image_path(gallery[0])).size == (128, 128)


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
    from studio.evaluate import write_b2_training_set

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


def test_train_the_quick_preset_then_generate_with_it(client, star_files, running_app):
    reply = _train(client, star_files, "star")
    assert "queued **star**" in reply
    deadline = time.time() + 600
    seen_progress = False
    while time.time() < deadline:
        status, percent, previews = client.predict(api_name="/job_status")
        seen_progress |= "step" in status and 0 < percent < 100
        if "done" in status or "failed" in status:
            break
        time.sleep(2)
    assert "done" in status, status
    assert seen_progress and previews
    table, _, _ = client.predict(api_name="/library")
    rows = table["data"] if isinstance(table, dict) else table
    assert rows[0][:3] == ["star", "lora", "shapes"]
    gallery, note = _generate(client, "a red sks on a blue background", steps=10, adapters=["star"])
    assert len(gallery) == 1 and "with star at 1" in note
    path, _ = client.predict("star", api_name="/export_kohya")
    assert str(path).endswith(".safetensors")
