from glob import glob

from setuptools import find_packages, setup

package_name = 'mm_llm_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    package_data={package_name: ['core/assets/*']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.xml')),
        ('share/' + package_name + '/config/sros2', glob('config/sros2/*.xml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='mm_llm_ros maintainers',
    maintainer_email='maintainers@mm-llm-ros.invalid',
    description='Multimodal language understanding for robots with ImageBind and ImageBind-LLM.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'camera_encoder = mm_llm_ros.ros.camera_encoder:main',
            'audio_encoder = mm_llm_ros.ros.audio_encoder:main',
            'lidar_encoder = mm_llm_ros.ros.lidar_encoder:main',
            'encoder = mm_llm_ros.ros.encoder:main',
            'llm_node = mm_llm_ros.ros.llm_node:main',
            'grounding_node = mm_llm_ros.ros.grounding_node:main',
            'ask = mm_llm_ros.ros.ask_client:main',
            'sensor_replay = mm_llm_ros.ros.sensor_replay:main',
            'demo = mm_llm_ros.demo:main',
            'evaluate = mm_llm_ros.evaluate:main',
            'fleet_policy = mm_llm_ros.fleet_policy:main',
        ],
    },
)
