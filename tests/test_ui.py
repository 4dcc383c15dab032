"""The web UI, driven through gradio_client against a running app on loopback."""

import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app():
    from studio.ui.app import build_app

    app = build_app("shapes").queue()
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_generate_through_the_page_api(running_app):
    from gradio_client import Client
    from PIL import Image

    client = Client(running_app, verbose=False)
    gallery, status = client.predict("shapes", "a large red circle on a gray background", "", 6, 5.0, 1, 2,
                                     api_name="/generate")
    assert len(gallery) == 2 and "2 image(s)" in status
    img = Image.open(gallery[0]["image"] if isinstance(gallery[0]["image"], str) else gallery[0]["image"]["path"])
    assert img.size == (128, 128)


def test_bad_input_is_a_message_and_the_server_keeps_serving(running_app):
    from gradio_client import Client

    client = Client(running_app, verbose=False)
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("shapes", "   ", "", 6, 5.0, 1, 1, api_name="/generate")
    with pytest.raises(Exception, match="no such model"):
        client.predict("/nonexistent/model", "a red circle", "", 6, 5.0, 1, 1, api_name="/generate")
    gallery, _ = client.predict("shapes", "a blue square", "", 4, 5.0, 2, 1, api_name="/generate")
    assert len(gallery) == 1
