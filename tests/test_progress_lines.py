"""pd_core.train.progress: the human durations and the image-progress line (rate and ETA from done / elapsed)."""

from pd_core.train.progress import format_seconds, images_line


def test_durations_read_as_seconds_minutes_or_hours():
    assert [format_seconds(s) for s in (59, 187, 7500, float("inf"))] == ["59s", "3m07s", "2h05m", "?"]


def test_the_images_line_has_the_share_done_the_rate_and_the_time_left_at_that_rate():
    # 640 of 1000 in 52 s: 12.31 img/s; 360 left at that rate is 29.25 s
    assert images_line("encode", done=640, total=1000, elapsed_s=52.0) == \
        "encode: 640/1000 images (64.0%), 12.31 img/s, ETA 29s"
    assert images_line("evaluate", done=0, total=10, elapsed_s=1.0).endswith("0.00 img/s, ETA ?")
