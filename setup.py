"""modelscope_cnclip: Chinese CLIP as a ModelScope plugin."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version = next(line.split("'")[1] for line in (HERE / 'modelscope_cnclip' / '__init__.py').read_text().splitlines()
               if line.startswith('__version__'))

# torch is left to the user (CUDA or CPU build); any 2.x from 2.1 works. See README for a CPU-only install.
CORE = [
    'torch>=2.1',
    'transformers>=4.41',
    'tokenizers>=0.15',
    'safetensors>=0.4',
    # registers the ModelScope classes when ModelScope looks them up, so importing the plugin imports no ModelScope
    'wrapt>=1.14',
    'numpy>=1.23',
    'pillow>=9.1',
    # ModelScope and what its pipeline/model registries import.
    'modelscope>=1.9',
    'addict',
    'datasets',
    'simplejson',
    'sortedcontainers',
]
EXTRAS = {
    # the official LMDB form of training data
    'train': ['lmdb'],
    # vector index and search (cnclip index / cnclip search)
    'index': ['faiss-cpu>=1.7.4'],
    # video embedding (frames read with decord; PyAV decodes the frames decord gets wrong, and writes test videos)
    'video': ['decord>=0.6', 'av'],
    # embedding jobs on a Ray cluster, and s3:// / gs:// inputs (pyarrow comes with Ray Data)
    'ray': ['ray[data]>=2.9'],
    # cnclip export and exported models: ONNX graphs, ONNX Runtime (CPU; onnxruntime-gpu for CUDA), OpenVINO IR and
    # NNCF int8. TensorRT engines also need `pip install tensorrt` on a CUDA machine.
    'export': ['onnx>=1.15', 'onnxruntime>=1.17', 'openvino>=2024.1', 'nncf>=2.10'],
    # cnclip serve: FastAPI on uvicorn, dynamic batching (mixedbread's batched), Prometheus metrics, httpx for image
    # URLs (off by default); Ray Serve for replicas and autoscaling (--engine ray)
    # (uvicorn[standard]: httptools and uvloop, several times faster per request than the pure-Python defaults)
    'serve': ['fastapi>=0.110', 'uvicorn[standard]>=0.29', 'batched>=0.1.4', 'prometheus_client>=0.20', 'httpx>=0.27',
              'ray[serve]>=2.9'],
    # cnclip demo and the studio app (Gradio); notebook pictures need only PIL
    'demo': ['gradio>=5'],
}
# six: lets the tests load --to hub output with ModelScope's built-in CLIP class.
EXTRAS['test'] = ['pytest>=7', 'six', *EXTRAS['train'], *EXTRAS['index'], *EXTRAS['video'], *EXTRAS['ray'],
                  *EXTRAS['export'], *EXTRAS['serve'], *EXTRAS['demo'], 'openai>=1.0',
                  # the browser test drives the system's Chromium (apt-get install chromium fonts-noto-cjk); the
                  # example notebook runs in a Jupyter kernel
                  'playwright>=1.40', 'nbclient>=0.9', 'nbformat>=5', 'ipykernel>=6',
                  # property-based tests of everything that reads untrusted input
                  'hypothesis>=6']
EXTRAS['all'] = sorted({req for name, reqs in EXTRAS.items() if name != 'test' for req in reqs})

setup(
    name='modelscope_cnclip',
    version=version,
    description='Chinese CLIP (RN50, ViT-B/L/H) as a ModelScope plugin: every checkpoint layout, official numbers',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8') if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['modelscope_cnclip', 'modelscope_cnclip.*']),
    package_data={'modelscope_cnclip': ['model_configs/*.json', 'resources/*']},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={'console_scripts': ['cnclip = modelscope_cnclip.cli:main']},
    classifiers=['Programming Language :: Python :: 3', 'Topic :: Scientific/Engineering :: Artificial Intelligence'],
)
