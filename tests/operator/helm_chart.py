"""Lint the chart and install it into an apiserver with the real Helm library (helm-sdkpy).

helm-sdkpy needs Python >= 3.12 while the project runs on 3.11, so the tests run this file with the
interpreter in $SPLITSERVE_HELM_PYTHON (a venv with helm-sdkpy) and read one JSON object from stdout:
{"lint": <helm lint result>, "release": <helm install result> | null, "error": <message> | null}.

    python helm_chart.py CHART KUBECONFIG NAMESPACE RELEASE VALUES_JSON
"""

import asyncio
import json
import sys

import helm_sdkpy


async def run(chart: str, kubeconfig: str, namespace: str, release: str, values: dict) -> dict:
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    result: dict = {"lint": await helm_sdkpy.Lint(config).run(chart), "release": None, "error": None}
    try:
        result["release"] = await helm_sdkpy.Install(config).run(
            release, chart, values=values, wait=False, timeout=60, create_namespace=False
        )
    except helm_sdkpy.HelmError as exc:
        result["error"] = str(exc)
    return result


if __name__ == "__main__":
    chart_, kubeconfig_, namespace_, release_, values_ = sys.argv[1:6]
    print(json.dumps(asyncio.run(run(chart_, kubeconfig_, namespace_, release_, json.loads(values_)))))
