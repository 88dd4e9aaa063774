"""The benchmark campaign: a ~2 KB text + html letter with 3 merge fields."""

from __future__ import annotations

from pathlib import Path

SENDER = "News <news@example.org>"
SUBJECT = "Hello {{ first_name }}, your November letter"
FIELDS = ("first_name", "last_name", "code")

_PARAGRAPH = (
    "This month we rebuilt the delivery pipeline, moved the archive to faster disks "
    "and answered every question that reached the help desk before Friday."
)

TEXT = (
    "Dear {{ first_name }} {{ last_name }},\n\n"
    + "\n\n".join([_PARAGRAPH] * 4)
    + "\n\nYour member code is {{ code }}.\n\nBest regards,\nThe News team\n"
)

HTML = (
    "<html><body>\n<p>Dear <b>{{ first_name }}</b> {{ last_name }},</p>\n"
    + "\n".join(f"<p>{_PARAGRAPH}</p>" for _ in range(4))
    + "\n<p>Your member code is <code>{{ code }}</code>.</p>\n"
    "<p>Best regards,<br>The News team</p>\n</body></html>\n"
)


def write_campaign(directory: Path, name: str = "Benchmark letter") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "body.txt").write_text(TEXT)
    (directory / "body.html").write_text(HTML)
    campaign = directory / "campaign.toml"
    campaign.write_text(
        f'name = "{name}"\nfrom = "{SENDER}"\nsubject = "{SUBJECT}"\n'
        'text = "body.txt"\nhtml = "body.html"\n'
    )
    return campaign


def recipient(i: int) -> tuple[str, str, str, str]:
    return f"user{i}@example.com", f"Name{i}", f"Family{i % 997}", f"C{i:07d}"


def write_list(path: Path, count: int) -> Path:
    """A CSV with an email column and the 3 merge fields, written in large blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        out.write("email," + ",".join(FIELDS) + "\n")
        block: list[str] = []
        for i in range(count):
            block.append(",".join(recipient(i)))
            if len(block) == 10_000:
                out.write("\n".join(block) + "\n")
                block = []
        if block:
            out.write("\n".join(block) + "\n")
    return path


def render_context(i: int) -> dict[str, str]:
    email, first, last, code = recipient(i)
    return {"email": email, "first_name": first, "last_name": last, "code": code}
