"""Where a metric's weights come from, and the one error a user sees when they cannot be had.

Every judge and metric loads its real weights the normal way (a public URL, the HF hub through open_clip,
the torch hub cache through torchvision) and also accepts a local file, by argument or environment
variable, for machines without internet. When neither works the user gets one `DuobenchError` naming the
file, where it comes from and where to put it, never a download traceback.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from duobench.errors import DuobenchError
from duobench.metrics.base import sha256_file
from duobench.paths import duobench_home

DOWNLOAD_TIMEOUT_SECONDS = 60


def weights_dir() -> Path:
    """``$DUOBENCH_HOME/weights``: where downloaded judge and metric files are kept."""
    return duobench_home() / "weights"


def fetch_weights(
    filename: str,
    url: str,
    what: str,
    env_var: str,
    local_path: str | Path | None = None,
    expected_sha256: str = "",
) -> Path:
    """Find ``filename`` locally or download it from ``url``; verify its sha256 when one is pinned.

    Order: ``local_path`` argument, then ``$<env_var>``, then ``$DUOBENCH_HOME/weights/<filename>``, then
    a download into that folder (written to a temporary name and renamed, so an interrupted download never
    leaves a truncated file that a later run would trust).
    """
    explicit = local_path or os.environ.get(env_var)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            origin = "argument" if local_path else env_var
            raise DuobenchError(f"The {what} file {path} (from {origin}) does not exist.")
    else:
        path = weights_dir() / filename
        if not path.is_file():
            _download(url, path, what, env_var)
    if expected_sha256:
        check_pinned_sha256(path, expected_sha256, what, f"the file at {url}", "Replace it with the original")
    return path


def check_pinned_sha256(path: Path, expected_sha256: str, what: str, origin: str, fix: str) -> str:
    """``path``'s sha256, or a `DuobenchError` naming the pinned and the found sha256 and ``fix`` when they
    differ: a preset's card names its weights, so other weights must not run under its id."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise DuobenchError(
            f"The {what} file {path} has sha256 {actual}, but this preset is pinned to {expected_sha256} "
            f"({origin}). {fix}, or use a preset whose card matches it."
        )
    return actual


def _download(url: str, path: Path, what: str, env_var: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            with open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
    except OSError as error:  # URLError, timeouts and disk errors are all OSErrors
        partial.unlink(missing_ok=True)
        raise DuobenchError(
            f"Cannot download the {what} ({type(error).__name__}: {error}). Download {url} on a machine with "
            f"internet and put it at {path}, or point ${env_var} at a local copy."
        ) from error
    partial.rename(path)


def load_open_clip(model_name: str, pretrained: str, env_var: str, local_path: str | Path | None, device):
    """Build an open_clip model with its eval preprocessing and tokenizer, plus ``(weights, sha256)``.

    The weights come from ``local_path`` / ``$<env_var>`` when given, otherwise from open_clip's own
    download of ``pretrained`` (HF hub, cached under ``~/.cache/huggingface``). OpenAI CLIP weights need
    QuickGELU, which open_clip only switches on by itself for the named tag, so it is forced here for
    local files too.
    """
    import open_clip

    explicit = local_path or os.environ.get(env_var)
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DuobenchError(f"The open_clip {model_name} weights file {path} does not exist.")
    else:
        from duobench.models import unreachable_errors

        try:
            path = Path(open_clip.download_pretrained(pretrained_cfg))
        except unreachable_errors() as error:  # HF hub / urllib errors offline: "not reachable"
            source = pretrained_cfg.get("hf_hub") or pretrained_cfg.get("url") or f"{model_name}/{pretrained}"
            raise DuobenchError(
                f"Cannot load the open_clip {model_name} '{pretrained}' weights ({type(error).__name__}). "
                f"open_clip downloads them from the HF hub repo {source} (open_clip_pytorch_model.bin) into "
                f"~/.cache/huggingface; offline, download that file elsewhere and point ${env_var} at it."
            ) from error
    quick_gelu = bool(pretrained_cfg.get("quick_gelu"))
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(path), force_quick_gelu=quick_gelu, device=device
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name), str(path), sha256_file(path)
