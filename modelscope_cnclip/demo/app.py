"""The retrieval demo: a Gradio app over a model and a gallery index (``cnclip demo``, the ModelScope studio app).

Tabs: 文搜图 (text-to-image search), 图搜图 (image-to-image search), 零样本分类 (zero-shot classification with
editable labels and prompt template), 图文打分 (images x texts scoring with a heat map: the official quick start).

:class:`Demo` holds the plain functions behind the tabs (tested without a browser); :func:`build_demo` wires them
into ``gradio.Blocks``, turning bad input (not an image, too large, a decompression bomb, an empty query) into a
message for the user instead of a stack trace.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from modelscope_cnclip.demo.render import heatmap

if TYPE_CHECKING:
    from PIL import Image

    from modelscope_cnclip.index import Index
    from modelscope_cnclip.inference import CNClip

logger = logging.getLogger(__name__)
DEFAULT_LABELS = '猫, 狗, 汽车, 花, 山, 大海, 城市夜景, 食物'
DEFAULT_TEMPLATE = '一张{}的照片'
DEFAULT_TEXTS = '杰尼龟\n妙蛙种子\n小火龙\n皮卡丘'
THUMBNAIL = 256
MAX_UPLOAD = '50mb'  # launch(max_file_size=...): Gradio refuses larger uploads before the app sees them
CACHE_ENV = 'CNCLIP_CACHE'


class DemoInputError(ValueError):
    """Bad input from the person using the demo: the message is shown to them."""


def split_labels(text: str) -> list[str]:
    """Labels typed into a box: separated by commas (also full-width and 、), semicolons or new lines; blanks and
    repeats dropped, order kept."""
    labels = [s.strip() for s in re.split(r'[,，、;；\n]+', text or '')]
    return list(dict.fromkeys(s for s in labels if s))


class Demo:
    """What the app's tabs do, as plain functions of their inputs.

    Args:
        model: any :class:`~modelscope_cnclip.CNClip` (torch or exported).
        index: a gallery :class:`~modelscope_cnclip.index.Index` built with this model (``None``: no search tabs).
        max_images: images per scoring request.
    """

    def __init__(self, model: CNClip, index: Index | None = None, *, max_images: int = 16,
                 max_texts: int = 50) -> None:
        if index is not None:
            index.check_model(model.fingerprint, model.source)
        self.model, self.index, self.max_images, self.max_texts = model, index, max_images, max_texts

    # --- inputs ---

    def _image(self, image: Any, what: str = 'the image') -> Image.Image:
        from modelscope_cnclip.transform import load_image
        if image is None or (isinstance(image, str) and not image):
            raise DemoInputError(f'请上传图片 (upload {what} first)')
        try:
            return load_image(image).convert('RGB')
        except (ValueError, TypeError, OSError) as e:
            name = Path(image).name if isinstance(image, (str, os.PathLike)) else what
            message = str(e).replace(repr(str(image)), repr(name)).replace(str(image), name)
            raise DemoInputError(f'无法读取图片 {name}: {message}') from None

    def _need_index(self) -> Index:
        if self.index is None:
            raise DemoInputError('没有图库 (no gallery: start the demo with --gallery DIR or --index DIR)')
        return self.index

    def _hits(self, vector: np.ndarray, k: int) -> list[tuple[Image.Image, str]]:
        from modelscope_cnclip.transform import load_image
        hits = self._need_index().search(vector, int(k))[0]
        out = []
        for hit in hits:
            try:
                img = load_image(hit.path, draft=THUMBNAIL).convert('RGB')
                img.thumbnail((THUMBNAIL, THUMBNAIL))
            except (OSError, ValueError, TypeError):
                from PIL import Image
                img = Image.new('RGB', (THUMBNAIL, THUMBNAIL), (230, 230, 230))
            out.append((img, f'{hit.id} · {hit.score:.3f}'))
        return out

    # --- the tabs ---

    def search_text(self, query: str, k: int = 12) -> list[tuple[Image.Image, str]]:
        """Text-to-image: the ``k`` gallery images nearest to ``query``, as ``(thumbnail, "id · score")``."""
        query = (query or '').strip()
        if not query:
            raise DemoInputError('请输入查询文字 (type a query first)')
        self._need_index()
        return self._hits(self.model.encode_text([query])[0].float().numpy(), k)

    def search_image(self, image: Any, k: int = 12) -> list[tuple[Image.Image, str]]:
        """Image-to-image: the ``k`` gallery images nearest to an uploaded image."""
        img = self._image(image, 'a query image')
        self._need_index()
        return self._hits(self.model.encode_image([img])[0].float().numpy(), k)

    def classify(self, image: Any, labels: str, template: str = DEFAULT_TEMPLATE) -> dict[str, float]:
        """Zero-shot classification: ``{label: probability}`` over the typed labels, each put into ``template``
        (``{}`` marks the label) and scored as ``CNClip.probabilities`` does."""
        img = self._image(image)
        names = split_labels(labels)
        if len(names) < 2:
            raise DemoInputError('请至少输入两个标签 (type at least two labels, separated by commas)')
        if len(names) > self.max_texts:
            raise DemoInputError(f'最多 {self.max_texts} 个标签 (at most {self.max_texts} labels at a time)')
        template = (template or '').strip() or '{}'
        if '{}' not in template:
            raise DemoInputError('模板里需要 {} 表示标签的位置 (the template needs {} where the label goes)')
        probs = self.model.probabilities([img], [template.replace('{}', n) for n in names])[0]
        return {n: float(p) for n, p in zip(names, probs.tolist())}

    def score(self, images: Sequence[Any] | None, texts: str) -> tuple[Image.Image, dict[str, list[Any]]]:
        """Images x texts: a heat map of each image's probabilities over the texts (the official quick start),
        and the table of them, ``{"headers": ["image", *texts], "data": [[name, p_1, ...], ...]}``."""
        files = [f for f in (images or []) if f]
        if not files:
            raise DemoInputError('请上传图片 (upload one or more images first)')
        if len(files) > self.max_images:
            raise DemoInputError(f'最多 {self.max_images} 张图片 (at most {self.max_images} images at a time)')
        names = split_labels(texts.replace(',', '\n') if texts else '')
        if not names:
            raise DemoInputError('请输入文字，每行一个 (type one or more texts, one a line)')
        if len(names) > self.max_texts:
            raise DemoInputError(f'最多 {self.max_texts} 条文字 (at most {self.max_texts} texts at a time)')
        pil = [self._image(f, f'image {i + 1}') for i, f in enumerate(files)]
        probs = self.model.probabilities(pil, names).float().numpy()
        labels = [Path(f).name if isinstance(f, (str, os.PathLike)) else f'image {i + 1}' for i, f in enumerate(files)]
        table = [[label, *[round(float(p), 4) for p in row]] for label, row in zip(labels, probs)]
        return heatmap(probs, pil, names, title='probabilities over the texts'), {'headers': ['image', *names],
                                                                                  'data': table}


def gallery_index(model: CNClip, gallery: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  progress: bool | None = None) -> Index:
    """The index of a folder of photos for ``model``: built once (embedding with a progress bar) and reused while
    the folder's files are unchanged; kept under ``cache_dir`` (default ``$CNCLIP_CACHE`` or
    ``~/.cache/modelscope_cnclip``), never inside the gallery.

    Raises:
        FileNotFoundError: ``gallery`` is not a folder. ValueError: it holds no image the model could read.
    """
    from modelscope_cnclip.index import Index
    from modelscope_cnclip.jobs import embed_collection, open_collection
    root = Path(gallery).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f'gallery {str(gallery)!r} is not a folder of images')
    photos = open_collection(root, 'image')  # scanned once: the key is made of exactly what gets embedded
    listing = hashlib.sha256()
    for item in photos.items:
        stat = os.stat(item.source)
        listing.update(f'{item.id}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode('utf-8', 'replace'))
    key = hashlib.sha256(f'{root}\0{model.fingerprint}\0{listing.hexdigest()}'.encode('utf-8', 'replace'))
    base = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'modelscope_cnclip')
    work = base / 'galleries' / key.hexdigest()[:20]
    if (work / 'index' / 'meta.json').is_file():
        logger.info('reusing the gallery index %s', work / 'index')
        return Index.load(work / 'index')
    report = embed_collection(model, photos, work / 'embeddings', progress=progress)
    if report.failed >= report.total:
        raise ValueError(f'gallery {str(gallery)!r}: no image could be read (errors: {work / "embeddings"})')
    index = Index.build(work / 'embeddings')
    index.save(work / 'index', overwrite=True)
    return index


def build_demo(model: CNClip, index: Index | None = None, *, title: str = 'Chinese CLIP 图文检索',
               top_k: int = 12, labels: str = DEFAULT_LABELS, template: str = DEFAULT_TEMPLATE) -> Any:
    """The Gradio app (``gradio.Blocks``; call ``.launch()``), over :class:`Demo`.

    Args:
        model: any loaded :class:`~modelscope_cnclip.CNClip`.
        index: the gallery's index (:func:`gallery_index`, or ``Index.load``); without one only the zero-shot and
            scoring tabs work.
        top_k: results shown by default; labels / template: the zero-shot tab's starting values.
    """
    import gradio as gr

    demo = Demo(model, index)

    def checked_image(**kwargs: Any) -> Any:
        """gr.Image whose upload reaches the app as the file's path, unread: Gradio's own preprocessing opens it with
        PIL and fails on a non-image with a bare exception, where the app's loader gives the user a message. (An
        instance override: subclassing a Gradio component makes Gradio write a .pyi stub beside this module.)"""
        image = gr.Image(type='filepath', sources=['upload', 'clipboard'], **kwargs)
        image.preprocess = lambda payload: None if payload is None else str(payload.path)
        return image

    def guarded(fn: Any) -> Any:
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except DemoInputError as e:
                raise gr.Error(str(e), print_exception=False) from None
        run.__name__ = fn.__name__
        return run

    size = len(index) if index is not None else 0
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f'## {title}\n{model.info()["arch"]} · {getattr(model, "backend", "torch")} · '
                    + (f'图库 {size:,} 张图片' if index is not None else '未加载图库 (no gallery)'))
        with gr.Tab('文搜图', id='text-search'):
            with gr.Row():
                query = gr.Textbox(label='查询 (query)', placeholder='例如：海边的日落', scale=4, elem_id='query')
                k_text = gr.Slider(1, max(50, top_k), value=top_k, step=1, label='top-k', scale=1)
            go = gr.Button('搜索 (search)', variant='primary', elem_id='search-button')
            results = gr.Gallery(label='结果 (id · score)', columns=4, height='auto', format='jpeg',
                                 elem_id='text-results')
            go.click(guarded(demo.search_text), [query, k_text], results, api_name='search_text')
            query.submit(guarded(demo.search_text), [query, k_text], results, api_name=False)
        with gr.Tab('图搜图', id='image-search'):
            with gr.Row():
                query_image = checked_image(label='查询图片 (query image)', elem_id='query-image')
                k_image = gr.Slider(1, max(50, top_k), value=top_k, step=1, label='top-k')
            go_image = gr.Button('搜索 (search)', variant='primary', elem_id='image-search-button')
            image_results = gr.Gallery(label='结果 (id · score)', columns=4, height='auto', format='jpeg',
                                       elem_id='image-results')
            go_image.click(guarded(demo.search_image), [query_image, k_image], image_results, api_name='search_image')
        with gr.Tab('零样本分类', id='zeroshot'):
            with gr.Row():
                zs_image = checked_image(label='图片 (image)', elem_id='zs-image')
                with gr.Column():
                    zs_labels = gr.Textbox(value=labels, label='候选标签 (labels, comma separated)', lines=3,
                                           elem_id='zs-labels')
                    zs_template = gr.Textbox(value=template, label='提示模板 (template, {} = label)',
                                             elem_id='zs-template')
                    zs_go = gr.Button('分类 (classify)', variant='primary', elem_id='zs-button')
            zs_out = gr.Label(num_top_classes=10, label='概率 (probabilities)', elem_id='zs-result')
            zs_go.click(guarded(demo.classify), [zs_image, zs_labels, zs_template], zs_out, api_name='classify')
        with gr.Tab('图文打分', id='score'):
            with gr.Row():
                sc_images = gr.File(file_count='multiple', file_types=['image'], type='filepath',
                                    label='图片 (images)', elem_id='score-images')
                sc_texts = gr.Textbox(value=DEFAULT_TEXTS, lines=5, label='文字，每行一个 (texts, one a line)',
                                      elem_id='score-texts')
            sc_go = gr.Button('打分 (score)', variant='primary', elem_id='score-button')
            sc_map = gr.Image(label='热力图 (heat map)', type='pil', elem_id='score-heatmap')
            sc_table = gr.Dataframe(label='概率 (probabilities)', elem_id='score-table')
            sc_go.click(guarded(demo.score), [sc_images, sc_texts], [sc_map, sc_table], api_name='score')
    return blocks
