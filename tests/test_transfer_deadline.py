"""A server that trickles bytes (each chunk inside the read timeout) is stopped by the total deadline."""

from __future__ import annotations

import pytest

from handlers.errors import DownloadFailed, UploadFailed
from worker.transfer import TransferClient


def test_trickling_download_hits_the_deadline_and_is_retryable(scripted):
    client = TransferClient(
        allow_private_urls=True, read_timeout=5, download_deadline_seconds=0.5, attempts=2, backoff_seconds=0
    )
    with pytest.raises(DownloadFailed) as err:
        client.download_image(f"{scripted.url}/trickle/3/in.png", field="images[0].url")

    assert err.value.retryable  # the network, not the job: the queue retries it later
    assert err.value.code == "timeout"
    assert "deadline" in err.value.message and "images[0].url" in err.value.message
    assert scripted.count("/trickle/3/in.png") == 2


def test_the_same_bytes_within_the_deadline_download_fine(scripted):
    client = TransferClient(allow_private_urls=True, download_deadline_seconds=10)
    image = client.download_image(f"{scripted.url}/trickle/0.3/in.png")
    assert image.size == (64, 64)


def test_an_upload_the_server_never_answers_in_time_is_a_retryable_timeout(scripted):
    client = TransferClient(allow_private_urls=True, read_timeout=0.3, attempts=2, backoff_seconds=0)
    with pytest.raises(UploadFailed) as err:
        client.upload(f"{scripted.url}/slow/2/out.png?X-Amz-Signature=secret", b"png", "image/png")
    assert (err.value.code, err.value.retryable) == ("timeout", True)
    assert "ReadTimeout" in err.value.message and "upload_url" in err.value.message
    assert "secret" not in err.value.message


def test_a_refused_connection_is_not_a_timeout(scripted):
    scripted.close()  # nothing listens there any more
    client = TransferClient(allow_private_urls=True, attempts=1, backoff_seconds=0)
    with pytest.raises(DownloadFailed) as err:
        client.download_image(f"{scripted.url}/in.png")
    assert (err.value.code, err.value.retryable) == ("download_failed", True)
