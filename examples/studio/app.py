"""A ModelScope studio (创空间) app: Chinese image-text retrieval over the photos in ./gallery, zero-shot
classification and image-text scoring. Copy this folder to the root of a studio repo (a studio runs its root's
app.py), add your photos under gallery/, and push.

Environment: CNCLIP_MODEL (default: the published ViT-B-16 on the ModelScope hub; any source `cnclip` loads, an
exported dir too), CNCLIP_GALLERY (default: ./gallery), CNCLIP_PRECISION (e.g. bf16 on CPUs with AVX512-BF16/AMX).
"""
import os
from pathlib import Path

from modelscope_cnclip import load
from modelscope_cnclip.demo.app import MAX_UPLOAD, build_demo, gallery_index

HERE = Path(__file__).resolve().parent
MODEL = os.environ.get('CNCLIP_MODEL', 'damo/multi-modal_clip-vit-base-patch16_zh')
GALLERY = Path(os.environ.get('CNCLIP_GALLERY', HERE / 'gallery'))

model = load(MODEL, precision=os.environ.get('CNCLIP_PRECISION') or None)
index = gallery_index(model, GALLERY, cache_dir=HERE / '.cache') if GALLERY.is_dir() else None
demo = build_demo(model, index, title='Chinese CLIP 图文检索')

if __name__ == '__main__':
    demo.launch(server_name='0.0.0.0', server_port=int(os.environ.get('PORT', 7860)), max_file_size=MAX_UPLOAD)
